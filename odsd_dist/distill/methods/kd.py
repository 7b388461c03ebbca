"""`kd`: Hinton et al. 2015 on full soft targets at T = 4 (METHODS.md §4); teacher and student see the weak view."""
from __future__ import annotations

from .base import Method, register, teacher_outputs
from .losses import kd_loss


@register
class KD(Method):
    name = "kd"
    views = 0

    def loss(self, batch, student, teacher):
        _, z_t = teacher_outputs(teacher, batch["weak"])
        z_s = student(batch["weak"])
        kd = kd_loss(z_s, z_t, self.opts.tau, batch.get("weight"))
        return {"total": kd, "kd": kd.detach()}
