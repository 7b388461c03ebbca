"""Seeded, vectorised hashes (splitmix64): a uniform number per key (a seeded shuffle without a sort) and a
hash per row of bytes (picks rows by content). Both depend on the inputs alone, never on block order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


def row_hash(rows: np.ndarray, words: int = 4) -> np.ndarray:
    """uint64 per row from its first `words` 8-byte words (splitmix64 chain): picks rows by content."""
    b = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)[:, : 8 * words]
    if b.shape[1] % 8:
        b = np.concatenate([b, np.zeros((len(b), -b.shape[1] % 8), np.uint8)], axis=1)
    w = np.ascontiguousarray(b).view(np.uint64)
    h = np.full(len(rows), np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        for j in range(w.shape[1]):
            h = _splitmix(h ^ w[:, j])
    return h


def key_uniform(keys: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A float64 in [0, 1) per key, fixed by (seed, key) alone: a seeded shuffle without a sort.

    Polynomial hash of the UTF-8 bytes (uint64, wrapping), then splitmix64 with the seed.
    """
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    arr = arr.cast(pa.large_string()) if arr.type == pa.string() else arr
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.float64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    start, end = offsets[:-1], offsets[1:]
    lengths = end - start
    b = data[offsets[0]: offsets[-1]].astype(np.uint64) + np.uint64(1)
    pos = np.arange(len(b), dtype=np.int64) - np.repeat(start - offsets[0], lengths)
    maxlen = int(lengths.max()) if n else 0
    powers = np.empty(max(maxlen, 1), dtype=np.uint64)
    powers[0] = 1
    with np.errstate(over="ignore"):
        for i in range(1, maxlen):
            powers[i] = powers[i - 1] * np.uint64(0x100000001B3)
        contrib = b * powers[pos]
        h = np.zeros(n, dtype=np.uint64)
        nz = lengths > 0
        if len(contrib):
            sums = np.add.reduceat(contrib, (start - offsets[0])[nz])
            h[nz] = sums
        h = h + np.uint64(lengths.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
        h = _splitmix(h ^ _splitmix(np.full(n, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
