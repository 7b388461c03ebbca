"""Score-table columns as numpy arrays: plain columns, the float16 feature column, float64 chunks of it."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def col_np(table: pa.Table, name: str, dtype=None) -> np.ndarray:
    a = table.column(name).to_numpy()
    return a if dtype is None else a.astype(dtype, copy=False)


def features_f16(table: pa.Table, d: int, name: str = "feature") -> np.ndarray:
    """fixed_size_list<float16>[d] column -> its float16 (n, d) values, as stored."""
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, d), np.float16)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), d)


def f64_chunks(x: np.ndarray, rows: int = 8192):
    """(start, float64 copy of x[start:start + rows]) over x, through one reused buffer: a block-sized float64
    copy of the features is fresh pages every block, whose faults cost as much as the math (docs/BENCHMARKS.md,
    design notes)."""
    buf = np.empty((min(rows, len(x)),) + x.shape[1:], np.float64)
    for i in range(0, len(x), rows):
        m = min(rows, len(x) - i)
        np.copyto(buf[:m], x[i:i + m])
        yield i, buf[:m]


def features_np(table: pa.Table, d: int, name: str = "feature") -> np.ndarray:
    """fixed_size_list<float16>[d] column -> float32 (n, d)."""
    return features_f16(table, d, name).astype(np.float32)
