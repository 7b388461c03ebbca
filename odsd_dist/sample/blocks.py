"""Shared pieces of the sampling passes: one Ray Data pass over the score table, column helpers,
order-independent (fixed-point) sums and a vectorised seeded hash of keys.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

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
    copy of the features is ~50 MB of fresh pages per block (the page faults cost as much as the math)."""
    buf = np.empty((min(rows, len(x)),) + x.shape[1:], np.float64)
    for i in range(0, len(x), rows):
        m = min(rows, len(x) - i)
        np.copyto(buf[:m], x[i:i + m])
        yield i, buf[:m]


def features_np(table: pa.Table, d: int, name: str = "feature") -> np.ndarray:
    """fixed_size_list<float16>[d] column -> float32 (n, d)."""
    return features_f16(table, d, name).astype(np.float32)


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


def run_pass(files: list[str], columns: list[str], fn: Callable, fn_kwargs: dict, batch_rows: int,
             preserve_order: bool = False) -> Iterator[pa.Table]:
    """Stream fn(batch, **fn_kwargs) over the score files with Ray Data; yield its result batches.

    fn returns a (small) pyarrow table per batch: a partial aggregate or the batch's candidates.
    The files are read with Ray Data's V1 Parquet reader (raytools.use_parquet_v1); the DataContext is
    restored afterwards. Read and fn run fused in one task per file: map_batches takes whole blocks
    (a batch_size, or fewer read tasks than Ray's minimum parallelism, would keep them apart and send
    every block through the object store: 10M rows, a no-op pass 9.2 s -> 6.5 s), and the task cuts
    them into batch_rows slices for fn itself.
    """
    import ray.data

    from ..raytools import use_parquet_v1

    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    saved_v2 = use_parquet_v1(ctx)
    saved_reservation = ctx.op_resource_reservation_enabled
    ctx.execution_options.preserve_order = preserve_order
    # One (fused) operator: Ray Data's per-operator reservation (half the cluster) only held it to half
    # the CPUs; without it both cores read (40 files of 100k rows, stats pass: 7.8 -> 3.5 s).
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.read_parquet(files, columns=columns, override_num_blocks=len(files))  # only these columns
        ds = ds.map_batches(_in_slices, fn_kwargs={"fn": fn, "fn_kwargs": fn_kwargs, "rows": batch_rows},
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            yield out
    finally:
        ctx.execution_options.preserve_order, ctx.use_datasource_v2 = saved_order, saved_v2
        ctx.op_resource_reservation_enabled = saved_reservation


def _in_slices(block: pa.Table, fn: Callable, fn_kwargs: dict, rows: int) -> pa.Table:
    outs = [fn(block.slice(i, rows), **fn_kwargs) for i in range(0, max(block.num_rows, 1), rows)]
    return outs[0] if len(outs) == 1 else pa.concat_tables(outs)


def count_scanned(rows: int) -> None:
    """odsd_sample_rows_scanned_total from inside a Ray Data task (never fails the pass)."""
    try:
        from ..metrics import ray_metric

        ray_metric("odsd_sample_rows_scanned_total").inc(rows)
    except Exception:
        pass


class PassTimer:
    """Seconds and rows per pass, for the summary and the benchmark."""

    def __init__(self):
        self.passes: list[dict] = []

    def run(self, name: str, rows: int, it: Iterator, consume: Callable[[pa.Table], None]) -> None:
        t0 = time.perf_counter()
        for b in it:
            consume(b)
        s = time.perf_counter() - t0
        self.passes.append({"pass": name, "rows": rows, "seconds": round(s, 3),
                            "rows_per_second": round(rows / s) if s > 0 else None})

    @property
    def rows_scanned(self) -> int:
        return sum(p["rows"] for p in self.passes)
