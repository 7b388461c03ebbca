"""`ce`: the student trained from labels alone (the "scratch" baseline of docs/METHODS.md §4); no teacher."""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from ...section import Section
from .base import Method, register, weighted_mean


class CEOptions(Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register
class CE(Method):
    name = "ce"
    Options = CEOptions
    needs_labels = True

    def loss(self, batch, student, teacher):
        z_s = student(batch["weak"]).float()
        per = F.cross_entropy(z_s, batch["label"].long(), reduction="none", label_smoothing=self.opts.label_smoothing)
        ce = weighted_mean(per, batch.get("weight"))
        return {"total": ce, "ce": ce.detach()}
