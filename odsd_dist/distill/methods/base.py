"""The method contract (ARCHITECTURE.md): one small `torch.nn.Module` per method, registered by name.

The training loop knows nothing method-specific: it hands `loss(batch, student, teacher)` a batch from
the data pipeline and backpropagates the returned `total`, logging every other term.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ...errors import UserError

# What the data pipeline supplies in every batch (float tensors are normalised N x C x H x W):
#   weak            the weak view: flip + pad-crop (the teacher's view; the student's for kd/ce)
#   view0, view1..  `views` strong views: random-resized crop, flip, colour jitter
#   weight          float (B,) sample weight from the selection (1 when absent)
#   tgt_idx/prob    int64/float (B, k') sparse low-noise teacher target (selection only; prob 0 = padding)
#   label           int64 (B,), -1 when the source has no labels


class Method(nn.Module):
    """Base class: set `name` and `views`; trainable parts (heads) are submodules, saved with the run."""

    name: str = ""
    views: int = 0  # strong views the pipeline must supply (view0 .. view{views-1}); `weak` always comes
    needs_labels: bool = False  # the data source must carry labels (e.g. `ce`)

    def __init__(self, opts, student_dim: int, teacher_dim: int, num_classes: int):
        super().__init__()
        self.opts = opts
        self.student_dim, self.teacher_dim, self.num_classes = student_dim, teacher_dim, num_classes

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module,
             teacher: Optional[nn.Module]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` (config `distill.method`)."""
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class for `name`; an unknown name is a UserError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"distill.method: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def build_method(name: str, opts, student_dim: int, teacher_dim: int, num_classes: int) -> Method:
    return method_class(name)(opts, student_dim, teacher_dim, num_classes)


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of the frozen teacher, without autograd, in float32."""
    with torch.no_grad():
        f = teacher.forward_features(x)
        z = teacher.classify(f)
    return f.float(), z.float()


def weighted_mean(per_sample: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """sum(w * l) / sum(w); the plain mean when no weights are given."""
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.dtype)
    return (w * per_sample).sum() / w.sum().clamp_min(1e-12)


LossFn = Callable[..., torch.Tensor]
