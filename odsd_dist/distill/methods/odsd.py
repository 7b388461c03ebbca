"""`odsd`: low-noise KD + DCRD (student self-contrast + teacher relations), METHODS.md §1.3-1.4.

The student sees two strong views in one forward pass; the teacher sees the weak view. Each term can be
switched off (`use_lnkd`, `use_self`, `use_rel`) for ablations; the heads train and checkpoint with the student.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from .base import Method, register, teacher_outputs
from .losses import low_noise_targets, nt_xent, relation_loss, relation_weights, sparse_kd_loss


@register
class ODSD(Method):
    name = "odsd"
    views = 2

    def __init__(self, opts, student_dim: int, teacher_dim: int, num_classes: int):
        super().__init__(opts, student_dim, teacher_dim, num_classes)
        if not (opts.use_lnkd or opts.use_self or opts.use_rel):
            raise UserError("distill.options: odsd needs at least one of use_lnkd, use_self, use_rel")
        if opts.use_self:  # 2-layer projection head (SimCLR-style)
            self.proj = nn.Sequential(nn.Linear(student_dim, student_dim), nn.ReLU(inplace=True),
                                      nn.Linear(student_dim, opts.proj_dim))
        if opts.use_rel:  # student features -> teacher feature space
            self.rel_map = nn.Linear(student_dim, teacher_dim)

    def loss(self, batch, student, teacher):
        o = self.opts
        v0, v1 = batch["view0"], batch["view1"]
        b = v0.shape[0]
        f_s = student.forward_features(torch.cat([v0, v1]))
        out: dict[str, torch.Tensor] = {}
        total = f_s.new_zeros((), dtype=torch.float32)
        need_teacher = o.use_rel or (o.use_lnkd and not self._stored_targets(batch))
        f_t = z_t = None
        if need_teacher:
            f_t, z_t = teacher_outputs(teacher, batch["weak"])
        if o.use_lnkd:
            if self._stored_targets(batch):
                idx, prob = batch["tgt_idx"], batch["tgt_prob"]
            else:
                idx, prob = low_noise_targets(z_t, o.target_topk, o.tau)
            z_s = student.classify(f_s)
            w = batch.get("weight")
            lnkd = 0.5 * (sparse_kd_loss(z_s[:b], idx, prob, o.tau, w) + sparse_kd_loss(z_s[b:], idx, prob, o.tau, w))
            out["lnkd"] = lnkd.detach()
            total = total + lnkd
        if o.use_self:
            h = self.proj(f_s)
            ls = nt_xent(h[:b], h[b:], o.self_temp)
            out["self"] = ls.detach()
            total = total + o.lambda_self * ls
        if o.use_rel:
            g = self.rel_map(f_s)
            w_rel = relation_weights(z_t, o.rel_conf_threshold)
            lr = 0.5 * (relation_loss(g[:b], f_t, o.rel_temp, w_rel) + relation_loss(g[b:], f_t, o.rel_temp, w_rel))
            out["rel"] = lr.detach()
            total = total + o.lambda_rel * lr
        out["total"] = total
        return out

    def _stored_targets(self, batch) -> bool:
        if self.opts.targets == "teacher":
            return False
        has = "tgt_idx" in batch and "tgt_prob" in batch
        if self.opts.targets == "selection" and not has:
            raise UserError("distill.options.targets=selection but the data has no stored targets")
        return has
