"""Sparse low-noise teacher targets (METHODS.md §1.3) from the score table's top-k logits.

softmax over the k' largest logits divided by tau is exactly softmax(z / tau) restricted to those k'
classes and renormalised (the common normaliser cancels), so the sparse top-k of the score table is
enough: the dropped tail is the noise the target leaves out.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def topk_matrix(col: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A list<...> column whose rows all have the same length k, as an (n, k) numpy array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=dtype)
    offsets = arr.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lengths.min() != lengths.max():
        raise ValueError("top-k lists have different lengths within one batch")
    k = int(lengths[0])
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    return values.astype(dtype, copy=False).reshape(n, k)


def low_noise_targets(topk_idx: np.ndarray, topk_logit: np.ndarray, k: int, tau: float):
    """(idx int32[n, k'], prob float32[n, k']): the k' largest logits, softmax at tau, descending."""
    n, have = topk_logit.shape
    k = min(k, have)
    if n == 0 or k == 0:
        return np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
    # Order by logit descending, ties by class index, so the result never depends on storage order.
    order = np.lexsort((topk_idx, -topk_logit), axis=1)[:, :k] if have > 1 else np.zeros((n, 1), np.int64)
    idx = np.take_along_axis(topk_idx, order, axis=1).astype(np.int32)
    z = np.take_along_axis(topk_logit, order, axis=1).astype(np.float64) / tau
    z -= z[:, :1]
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return idx, p.astype(np.float32)


def to_list_array(m: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """(n, k) numpy matrix -> list<value_type> array with n rows of length k."""
    n, k = m.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(m).reshape(-1), type=value_type))
