"""A teacher's inference forward, (logits, penultimate features) in one call, frozen for speed.

`inference_forward(model, example, "jit")` traces the feature extractor, freezes its weights into the
graph and runs TorchScript's inference passes: BatchNorm folded into the preceding convolution, and on
CPU the convolutions kept in oneDNN's blocked layout between layers. The classifier head stays eager:
frozen, its oneDNN linear rounds a row differently depending on its position in the batch (1 ulp), and a
row's scores must not depend on the batch Ray Data put it in (a resumed run writes the same table as an
uninterrupted one; tests/test_models.py checks this). The math is the eager module's to float32 rounding;
on CPU the frozen forward is the faster (figures: docs/BENCHMARKS.md, design notes). A model that cannot be
traced falls back to eager, with a warning; "eager" asks for the module as it is.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class Features(nn.Module):
    """forward(x) -> penultimate features of a zoo model (what gets traced)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class LogitsAndFeatures:
    """(logits, features): the given feature extractor (the model's own or a frozen trace of it), then the
    model's classifier on its output."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], model: nn.Module):
        self.features, self.model = features, model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.model.classify(f), f


def inference_forward(model: nn.Module, example: torch.Tensor, mode: str = "jit") -> tuple[Callable, str]:
    """(forward returning (logits, features), the mode actually used: "jit" or "eager")."""
    model.eval()
    eager = LogitsAndFeatures(model.forward_features, model)
    if mode == "eager":
        return eager, "eager"
    try:
        # torch 2.13 marks trace/freeze deprecated in favour of torch.compile; that needs a C++ toolchain
        # and compiles in every actor (and again for new batch shapes) at start-up: TorchScript it is for now
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(Features(model).eval(), example, check_trace=False)
            frozen = LogitsAndFeatures(torch.jit.optimize_for_inference(torch.jit.freeze(traced)), model)
            frozen(example)  # the first call runs the graph executor's passes; fail here, not mid-run
        return frozen, "jit"
    except Exception as e:  # noqa: BLE001 - any tracing failure: the eager module still scores correctly
        log.warning("teacher could not be frozen with TorchScript (%s: %s); scoring with the eager module",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return eager, "eager"
