"""`kd`: Hinton et al. 2015 on full soft targets at T = 4 (docs/METHODS.md §4).

`strong=true` is the fair baseline beside ODSD (the quality benchmark's `kd_strong` row): the student sees
the same two strong views as ODSD's student and the teacher the weak view, so that augmentation strength
is not mistaken for the method.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ...section import Section
from .base import Method, register
from .losses import kd_loss


class KDOptions(Section):
    tau: float = Field(4.0, gt=0)  # temperature
    strong: bool = False  # student on two strong views (teacher on the weak view), as ODSD's student


@register
class KD(Method):
    name = "kd"
    Options = KDOptions
    cached_teacher = True

    @classmethod
    def views(cls, opts) -> int:
        return 2 if opts.strong else 0

    def loss(self, batch, student, teacher):
        _, z_t = self.teacher_outputs(batch, teacher)
        w = batch.get("weight")
        if not self.opts.strong:
            kd = kd_loss(student(batch["weak"]), z_t, self.opts.tau, w)
        else:
            b = z_t.shape[0]
            z_s = student(torch.cat([batch["view0"], batch["view1"]]))
            kd = 0.5 * (kd_loss(z_s[:b], z_t, self.opts.tau, w) + kd_loss(z_s[b:], z_t, self.opts.tau, w))
        return {"total": kd, "kd": kd.detach()}

