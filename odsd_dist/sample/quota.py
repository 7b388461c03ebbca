"""Per-class quotas with hand-over: N/C per class; what a class cannot fill goes to the others.

A class with fewer candidates than its quota keeps all of them and hands the shortfall to the
classes that still have candidates left, in proportion to how many they have left (largest
remainder, ties by class index), repeated until the quota is placed or the pool is exhausted.
"""
from __future__ import annotations

import numpy as np


def _apportion(amount: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer `amount` in proportion to integer `weights` (largest remainder, ties by index)."""
    weights = np.asarray(weights, dtype=np.int64)
    total = int(weights.sum())
    out = np.zeros(len(weights), dtype=np.int64)
    if amount <= 0 or total <= 0:
        return out
    exact = weights.astype(object) * amount  # exact integer arithmetic, no float rounding
    out = np.array([int(e // total) for e in exact], dtype=np.int64)
    rem = np.array([int(e % total) for e in exact], dtype=np.int64)
    left = amount - int(out.sum())
    if left > 0:
        order = np.lexsort((np.arange(len(weights)), -rem))  # largest remainder first, then class index
        out[order[:left]] += 1
    return out


def class_quotas(n: int, candidates) -> np.ndarray:
    """Quota per class for `n` images given the candidate count of each class (int64[C])."""
    cand = np.asarray(candidates, dtype=np.int64)
    c = len(cand)
    if c == 0:
        return np.zeros(0, dtype=np.int64)
    n = int(min(n, int(cand.sum())))
    base, extra = divmod(n, c)
    quota = np.full(c, base, dtype=np.int64)
    quota[:extra] += 1  # the first `extra` classes take the remainder of n / C
    for _ in range(c + 1):
        short = quota > cand
        deficit = int((quota - cand)[short].sum())
        quota = np.minimum(quota, cand)
        if deficit == 0:
            break
        room = cand - quota
        if room.sum() == 0:
            break
        quota += np.minimum(_apportion(deficit, room), room)
    # Rounding can leave a few images unplaced when every remaining class is capped: place them one
    # by one in class order (still never above a class's candidates).
    left = n - int(quota.sum())
    for k in range(c):
        if left <= 0:
            break
        add = min(left, int(cand[k] - quota[k]))
        quota[k] += add
        left -= add
    return quota
