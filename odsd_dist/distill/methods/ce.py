"""`ce`: the student trained from labels alone (the "scratch" baseline of METHODS.md §4); no teacher."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register, weighted_mean


@register
class CE(Method):
    name = "ce"
    views = 0
    needs_labels = True

    def loss(self, batch, student, teacher):
        z_s = student(batch["weak"]).float()
        per = F.cross_entropy(z_s, batch["label"].long(), reduction="none", label_smoothing=self.opts.label_smoothing)
        ce = weighted_mean(per, batch.get("weight"))
        return {"total": ce, "ce": ce.detach()}
