"""`mosaickd`: Mosaicking to Distill (Fang et al., NeurIPS 2021), after the authors' kd_mosaic.py.

Four players: the frozen teacher, the student, a generator G and a patch discriminator D (own Adam
optimizers, cosine schedules). Every `student_steps` loop steps, first D learns to tell pool patches
from generated ones, then G learns to make images whose patches look like the pool's (local), which the
teacher classifies confidently (align) and evenly over classes (balance), and on which the student
disagrees with the teacher (adv). Every loop step is one student update on [G(z), pool batch] with
KL(T || S) at `tau`. The pool batch is the selection (the authors keep the pool's highest-entropy images:
`sample.method=entropy-high`). Needs a live teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ...section import Section
from ._gan import PATCH_SIZES, Generator, PatchDiscriminator
from .base import Method, register
from .losses import kd_loss
from ..step import cosine_factor


class MosaicKDOptions(Section):
    adv: float = Field(1.0, ge=0)  # G: -KL(T || S) on generated images (fool the student)
    align: float = Field(1.0, ge=0)  # G: teacher entropy on generated images (label-space alignment)
    local: float = Field(1.0, ge=0)  # G: fool the patch discriminator; also scales D's loss (as the authors)
    balance: float = Field(10.0, ge=0)  # G: sum(p_mean log2 p_mean) over the batch (class balance)
    tau: float = Field(1.0, gt=0)  # KL temperature of the student's loss and of `adv`
    student_steps: int = Field(5, ge=1)  # student updates per generator/discriminator update
    z_dim: int = Field(100, ge=1)
    ngf: int = Field(64, ge=1)
    ndf: int = Field(128, ge=1)
    patch_size: int = 10  # D's receptive field: 4, 10 (the authors' default) or 22 pixels
    lr_g: float = Field(1e-3, gt=0)  # G and D: Adam, betas (0.5, 0.999), cosine to 0
    beta1: float = Field(0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _patch(self) -> "MosaicKDOptions":
        if self.patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {', '.join(map(str, PATCH_SIZES))}")
        return self


def _bce_sum(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="sum")


@register
class MosaicKD(Method):
    name = "mosaickd"
    Options = MosaicKDOptions

    def __init__(self, opts, dims):
        super().__init__(opts, dims)
        if dims.input_size % 4:
            raise ValueError(f"mosaickd: the generator needs an input size divisible by 4, got {dims.input_size}")
        c = dims.in_chans

        def adam(params):
            return torch.optim.Adam(params, lr=opts.lr_g, betas=(opts.beta1, 0.999))

        self.add_aux("generator", Generator(opts.z_dim, opts.ngf, dims.input_size, c), adam, cosine_factor)
        self.add_aux("discriminator", PatchDiscriminator(c, opts.ndf, opts.patch_size), adam, cosine_factor)
        self.register_buffer("mean", torch.tensor(dims.mean[:c], dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(dims.std[:c], dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    def aux_steps(self, total_steps: int) -> int:
        return -(-total_steps // self.opts.student_steps)

    def _generate(self, ctx, n: int, tag: int) -> torch.Tensor:
        g = self.aux["generator"].module
        z = torch.randn(n, self.opts.z_dim, generator=ctx.generator(tag), device=ctx.device)
        return (g(z) - self.mean.float()) / self.std.float()

    def train_step(self, batch, ctx):
        o = self.opts
        pool = batch["weak"]
        b = pool.shape[0]
        out: dict[str, torch.Tensor] = {}
        if ctx.step % o.student_steps == 0:
            out.update(self._adversarial_step(ctx, pool))
        with torch.no_grad():
            fake = self._generate(ctx, b, tag=2).to(pool.dtype)
            x = torch.cat([fake, pool])
            z_t = ctx.teacher(x).float()
        kd = ctx.forward(lambda: kd_loss(ctx.student(x), z_t, o.tau))
        ctx.student_step(kd)
        out["total"] = kd.detach()
        out["student_kd"] = kd.detach()
        return out

    def _adversarial_step(self, ctx, pool: torch.Tensor) -> dict[str, torch.Tensor]:
        o, b = self.opts, pool.shape[0]
        disc = self.aux["discriminator"].module
        fake = self._generate(ctx, b, tag=1)
        # D: pool patches are real, generated patches fake
        d_fake, d_real = disc(fake.detach()), disc(pool.float())
        loss_d = o.local * (_bce_sum(d_fake, 0.0) + _bce_sum(d_real, 1.0)) / (2 * b)
        ctx.aux_step("discriminator", loss_d)
        # G: through the frozen teacher and the student (no student gradient is kept: StepContext.aux_step)
        x = fake.to(ctx.dtype)
        z_t = ctx.teacher(x).float()
        z_s = ctx.through_student(ctx.student, x).float()
        p_t = torch.softmax(z_t, 1)
        align = -(p_t * torch.log_softmax(z_t, 1)).sum(1).mean()
        adv = -kd_loss(z_s, z_t, o.tau)
        d_out = disc(fake)
        local = _bce_sum(d_out, 1.0) / b
        p_mean = p_t.mean(0)
        balance = (p_mean * torch.log2(p_mean.clamp_min(1e-12))).sum()
        loss_g = o.adv * adv + o.align * align + o.local * local + o.balance * balance
        ctx.aux_step("generator", loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "g_adv": adv.detach(),
                "g_align": align.detach(), "g_local": local.detach(), "g_balance": balance.detach()}
