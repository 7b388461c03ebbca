"""What teacher training and distillation share: the learning-rate schedule and the SGD optimizer.

Both train with SGD under a linear warm-up followed by a cosine decay to zero; the teacher trainer warms
up over a fraction of its steps (from lr/25 under `onecycle`), a distillation run over `warmup_steps`.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


def warmup_cosine(step: int, total: int, warmup: int, start: float = 0.0) -> float:
    """The factor of the peak learning rate at optimizer step `step` (0-based) of `total`: linear from
    `start` to 1 over the first `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return start + (1.0 - start) * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def sgd(params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float, weight_decay: float,
        nesterov: bool = False, no_decay: Iterable[torch.nn.Parameter] = ()) -> torch.optim.SGD:
    """SGD with momentum; `no_decay` parameters (e.g. BatchNorm weights and biases) take no weight decay."""
    groups = [{"params": list(params), "weight_decay": weight_decay}]
    rest = list(no_decay)
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
