"""The method contract (docs/DEVELOPING.md): a method is a training step, registered by name.

A method declares
- `Options`: its own options model (a `Section`), validated at config load under
  `distill.options.<name>` (an unknown or out-of-range key is an error naming it, before any Ray work);
- `views(opts)`: how many strong views the data pipeline must supply, and `needs_labels`;
- heads: ordinary submodules (projection heads, ...), trained by the student's DeepSpeed engine and
  checkpointed with it;
- aux modules: networks with optimizers of their own (a generator, a discriminator), added with
  `add_aux(...)`; they are replicated on every rank, their gradients are averaged across workers, and
  they are checkpointed and restored with the student by the loop (distill/step.py);
- `train_step(batch, ctx)`: one training step. The default wraps `loss(batch, student, teacher)` and
  takes one student step with the returned `total`, so a loss-only method writes only `loss()`.

The loop knows nothing method-specific: it calls `train_step` and logs every term it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...section import Section
from ...errors import UserError

# What the data pipeline supplies in every batch (float tensors are normalised N x C x H x W):
#   weak            the weak view: flip + pad-crop (the teacher's view; the student's for kd/ce)
#   view0, view1..  `views(opts)` strong views: random-resized crop, flip, colour jitter
#   weight          float (B,) sample weight from the selection (1 when absent)
#   tgt_idx/prob    int64/float (B, k') sparse low-noise teacher target (selection only; prob 0 = padding)
#   label           int64 (B,), -1 when the source has no labels


class NoOptions(Section):
    """A method without options."""


@dataclass(frozen=True)
class Dims:
    """What a method may size its modules by: the two networks' feature widths and the data's shape."""

    student_dim: int
    teacher_dim: int
    num_classes: int
    input_size: int = 32
    in_chans: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def of(cls, tmeta: dict, student_dim: int, teacher_dim: int) -> "Dims":
        """The sizes for a teacher with metadata `tmeta` (models/io) and the two feature widths."""
        c = int(tmeta["in_chans"])
        return cls(student_dim, teacher_dim, int(tmeta["num_classes"]), int(tmeta["input_size"]), c,
                   tuple(tmeta.get("mean") or [0.0] * c), tuple(tmeta.get("std") or [1.0] * c))


@dataclass
class Aux:
    """A module a method trains with its own optimizer (and optional per-step LR factor)."""

    module: nn.Module
    make_optimizer: Callable[[list], torch.optim.Optimizer]
    lr_factor: Optional[Callable[[int, int], float]] = None  # (aux step, total aux steps) -> factor


class Method(nn.Module):
    """Base class: set `name`, `Options`, and write `loss()` (or `train_step()` for a multi-network method)."""

    name: str = ""
    Options: type[Section] = NoOptions
    needs_labels: bool = False  # the data source must carry labels (e.g. `ce`)
    stats: tuple[str, ...] = ()  # returned terms that are not losses (exported as odsd_distill_stat)
    cached_teacher: bool = False  # can learn from stored teacher outputs (distill.teacher_outputs=cached)

    def __init__(self, opts, dims: Dims):
        super().__init__()
        self.opts = opts
        self.dims = dims
        # aux modules live outside the module tree: the DeepSpeed engine must neither train nor partition them
        object.__setattr__(self, "_aux", {})

    # --- what the data pipeline must supply ---
    @classmethod
    def views(cls, opts) -> int:
        return 0

    @classmethod
    def check(cls, opts, dims: Dims, student: nn.Module) -> None:
        """Checks that need the real sizes and student (before any Ray work); raise UserError naming the key."""

    @classmethod
    def selection_warnings(cls, opts, selection_meta: dict) -> list[str]:
        """Warnings about a selection made for other settings (printed before training)."""
        return []

    # --- aux modules ---
    def add_aux(self, name: str, module: nn.Module, make_optimizer, lr_factor=None) -> nn.Module:
        self._aux[name] = Aux(module, make_optimizer, lr_factor)
        return module

    @property
    def aux(self) -> dict[str, Aux]:
        return self._aux

    def aux_steps(self, total_steps: int) -> int:
        """How many optimizer steps each aux module takes in a run of `total_steps` loop steps (its schedule)."""
        return total_steps

    def extra_state(self) -> dict[str, Any]:
        """Anything else the method must carry across a resume (JSON-able); aux modules are saved by the loop."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def teacher_outputs(self, batch: dict, teacher: Optional[nn.Module], view: str = "weak"):
        """(features, logits) of the teacher on `view`: the stored ones when the batch carries them (cached
        teacher outputs: top-k logits, the rest -1e4, i.e. probability 0), else the frozen teacher's."""
        if "t_idx" in batch:
            idx = batch["t_idx"].long()
            z = torch.full((idx.shape[0], self.dims.num_classes), -1e4, device=idx.device)
            z.scatter_(1, idx, batch["t_val"].float())
            return batch["t_feat"].float(), z
        return teacher_outputs(teacher, batch[view])

    # --- the step ---
    def train_step(self, batch: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """One step: the default is one student update on `loss()`'s `total` (distill/step.py's StepContext)."""
        terms = ctx.forward(self.loss, batch, ctx.student, ctx.teacher)
        ctx.student_step(terms["total"])
        return terms

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module,
             teacher: Optional[nn.Module]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"method {self.name!r} writes neither loss() nor train_step()")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` (config `distill.method`)."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__}: a registered method needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class for `name`; an unknown name is a UserError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"distill.method: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def registry() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def build_method(name: str, options, dims: Dims) -> Method:
    """The method `name` built with its own options (`options` is the whole `distill.options` section)."""
    cls = method_class(name)
    return cls(getattr(options, name), dims)


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
