"""`odsd`: low-noise KD + DCRD (student self-contrast + teacher relations), METHODS.md §1.3-1.4.

The student sees two strong views in one forward pass; the teacher sees the weak view. Each term can be
switched off (`use_lnkd`, `use_self`, `use_rel`) for ablations; the heads train and checkpoint with the student.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ...section import Section
from ...errors import UserError
from .base import Method, register
from .losses import low_noise_targets, nt_xent, relation_loss, relation_weights, sparse_kd_loss


class ODSDOptions(Section):
    tau: float = Field(4.0, gt=0)  # L_lnkd temperature (the selection's targets are made at sample.targets.tau)
    lambda_self: float = Field(0.5, ge=0)  # weight of L_self (student self-contrast)
    lambda_rel: float = Field(1.0, ge=0)  # weight of L_rel (teacher relations)
    use_lnkd: bool = True  # ablation switches, one per term
    use_self: bool = True
    use_rel: bool = True
    proj_dim: int = Field(128, ge=1)  # L_self projection head output
    self_temp: float = Field(0.2, gt=0)  # NT-Xent temperature
    rel_temp: float = Field(0.1, gt=0)  # relation softmax temperature
    rel_conf_threshold: float = Field(0.5, ge=0, le=1)  # teacher maxprob below this down-weights a relation row
    targets: Literal["auto", "selection", "teacher"] = "auto"  # L_lnkd targets: stored (selection) or online
    target_topk: int = Field(3, ge=1)  # k' for online low-noise targets

    @model_validator(mode="after")
    def _one_term(self) -> "ODSDOptions":
        if not (self.use_lnkd or self.use_self or self.use_rel):
            raise ValueError("odsd needs at least one of use_lnkd, use_self, use_rel")
        return self


@register
class ODSD(Method):
    name = "odsd"
    Options = ODSDOptions
    cached_teacher = True

    @classmethod
    def views(cls, opts) -> int:
        return 2

    @classmethod
    def selection_warnings(cls, opts, selection_meta: dict) -> list[str]:
        tau = ((selection_meta.get("config") or {}).get("targets") or {}).get("tau")
        if tau is not None and opts.use_lnkd and abs(float(tau) - opts.tau) > 1e-9:
            return [f"the selection's targets were made at tau={tau}, distill.options.odsd.tau={opts.tau}"]
        return []

    def __init__(self, opts, dims):
        super().__init__(opts, dims)
        student_dim, teacher_dim = dims.student_dim, dims.teacher_dim
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
            f_t, z_t = self.teacher_outputs(batch, teacher)
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
            raise UserError("distill.options.odsd.targets=selection but the data has no stored targets")
        return has
