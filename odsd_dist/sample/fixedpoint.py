"""Order-independent sums: per-row values quantised to fixed point before summing, so that totals do not
depend on how Ray Data cut the blocks or on the merge order (the same inputs give the same selection)."""
from __future__ import annotations

import numpy as np


def quantise(x, scale: float) -> np.ndarray:
    """Per-row values -> integer-valued float64 (fixed point at 1/scale)."""
    return np.round(np.asarray(x, dtype=np.float64) * scale)


def qsum(q: np.ndarray, axis=None) -> np.ndarray:
    """Exact int64 sum of quantised values (float64 adds integers below 2^53 without rounding).

    Quantising every row *before* summing makes the totals independent of how Ray Data cut the
    blocks and of the merge order: the same inputs give bit-identical statistics, hence identical
    selections.
    """
    return np.asarray(q.sum(axis=axis)).astype(np.int64)


def from_fixed(x, scale: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / scale
