"""`kd3`: knowledge distillation between different distributions (KD^3, Tang et al., ICCV 2023), as far as
the paper's summary goes; the exact forms and constants are ours (docs/METHODS.md §2, each an option).

- Dynamic instance selection: p = (p_T + p_S) / 2 on the current batch; an image counts when max p >=
  `delta`, weighted by max p. Re-decided at every step as the student changes (needs a live teacher).
- Feature alignment through the teacher's frozen classifier: a student projector g maps student features
  to the teacher's width; L_feat = weighted (MSE(g, f_T) + KL(p_T || softmax(T.classify(g)))).
- MixDistribution: at an intermediate student layer, each image's channel mean/std are mixed with another
  image's (lambda ~ Beta(alpha, alpha)); L_md = InfoNCE between the original and the mixed images'
  projected embeddings (positives: the same image).
- Total: L_kd + feat * L_feat + md * L_md, with L_kd the weighted Hinton KD at `tau`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...section import Section
from ...errors import UserError
from .base import Method, register, teacher_outputs, weighted_mean
from .losses import nt_xent

MIX_LAYERS_AUTO = ("layer1", "block1", "features.3")  # the zoo's first stage: resnets, wrn, mobilenetv2


class KD3Options(Section):
    tau: float = Field(4.0, gt=0)  # KD temperature
    delta: float = Field(0.4, ge=0, le=1)  # keep an image when max of (p_T + p_S)/2 reaches this
    feat: float = Field(1.0, ge=0)  # weight of L_feat
    md: float = Field(0.5, ge=0)  # weight of L_md
    alpha: float = Field(0.1, gt=0)  # Beta(alpha, alpha) of the statistics mix (MixStyle's 0.1)
    md_temp: float = Field(0.2, gt=0)  # InfoNCE temperature of L_md
    proj_dim: int = Field(128, ge=1)  # L_md embedding width
    mix_layer: str = "auto"  # the student module whose output is mixed (auto: the first stage)


def resolve_mix_layer(student: nn.Module, name: str) -> str:
    names = MIX_LAYERS_AUTO if name == "auto" else (name,)
    mods = dict(student.named_modules())
    for n in names:
        if n in mods:
            return n
    raise UserError(f"distill.options.kd3.mix_layer: the student has no module {name!r}"
                    + (f" (tried {', '.join(names)})" if name == "auto" else ""))


def mix_statistics(h: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle: normalise each image's channels, then give them the lam-mix of its and perm's mean/std."""
    mu = h.mean(dim=(2, 3), keepdim=True)
    sig = (h.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    lam = lam.view(-1, 1, 1, 1).to(h.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (h - mu) / sig * sig_mix + mu_mix


@register
class KD3(Method):
    name = "kd3"
    Options = KD3Options
    stats = ("kept",)

    @classmethod
    def check(cls, opts, dims, student) -> None:
        resolve_mix_layer(student, opts.mix_layer)

    def __init__(self, opts, dims):
        super().__init__(opts, dims)
        self.projector = nn.Linear(dims.student_dim, dims.teacher_dim)
        self.md_head = nn.Sequential(nn.Linear(dims.student_dim, dims.student_dim), nn.ReLU(inplace=True),
                                     nn.Linear(dims.student_dim, opts.proj_dim))

    def train_step(self, batch, ctx):
        x = batch["weak"]
        n = x.shape[0]
        g = ctx.generator(3)
        perm = torch.randperm(n, generator=g, device=x.device)
        # lambda ~ Beta(alpha, alpha) as Ga / (Ga + Gb), from the step's seeded generator
        ga = torch._standard_gamma(torch.full((n,), self.opts.alpha, device=x.device), generator=g)
        gb = torch._standard_gamma(torch.full((n,), self.opts.alpha, device=x.device), generator=g)
        lam = ga / (ga + gb).clamp_min(1e-12)
        f_t, z_t = teacher_outputs(ctx.teacher, x)
        layer = ctx.student.get_submodule(resolve_mix_layer(ctx.student, self.opts.mix_layer))
        terms = ctx.forward(self._losses, ctx.student, ctx.teacher, layer, x, f_t, z_t, perm, lam)
        ctx.student_step(terms["total"])
        return terms

    def _losses(self, student, teacher, layer, x, f_t, z_t, perm, lam):
        o = self.opts
        f_s = student.forward_features(x)
        z_s = student.classify(f_s).float()
        with torch.no_grad():
            p = 0.5 * (torch.softmax(z_t, 1) + torch.softmax(z_s, 1))
            conf = p.max(1).values
            w = torch.where(conf >= o.delta, conf, torch.zeros_like(conf))
        kept = (w > 0).float().mean()
        log_p_t = F.log_softmax(z_t / o.tau, 1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(z_s / o.tau, 1))).sum(1) * o.tau * o.tau
        l_kd = _wmean(kl, w)
        g_s = self.projector(f_s)
        mse = (g_s.float() - f_t).pow(2).mean(1)
        z_shared = teacher.classify(g_s.to(next(teacher.parameters()).dtype)).float()
        log_t1 = F.log_softmax(z_t, 1)
        kl_shared = (log_t1.exp() * (log_t1 - F.log_softmax(z_shared, 1))).sum(1)
        l_feat = _wmean(mse + kl_shared, w)
        hook = layer.register_forward_hook(lambda _m, _i, out: mix_statistics(out, perm, lam))
        try:
            f_mix = student.forward_features(x)
        finally:
            hook.remove()
        l_md = nt_xent(self.md_head(f_s), self.md_head(f_mix), o.md_temp)
        total = l_kd + o.feat * l_feat + o.md * l_md
        return {"total": total, "kd": l_kd.detach(), "feat": l_feat.detach(), "md": l_md.detach(),
                "feat_mse": _wmean(mse, w).detach(), "feat_cls": _wmean(kl_shared, w).detach(), "kept": kept}


def _wmean(per: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the kept images; 0 (still in the graph) when none is kept."""
    if float(w.sum()) <= 0:
        return per.sum() * 0.0
    return weighted_mean(per, w)
