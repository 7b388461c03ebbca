"""One Ray Data pass over the score table (`run_pass`), its per-task metric and its timing."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import pyarrow as pa
import ray.data

from ..metrics import ray_metric
from ..raytools import use_parquet_v1


def run_pass(files: list[str], columns: list[str], fn: Callable, fn_kwargs: dict, batch_rows: int,
             preserve_order: bool = False) -> Iterator[pa.Table]:
    """Stream fn(batch, **fn_kwargs) over the score files with Ray Data; yield its result batches.

    fn returns a (small) pyarrow table per batch: a partial aggregate or the batch's candidates.
    The files are read with Ray Data's V1 Parquet reader (raytools.use_parquet_v1); the DataContext is
    restored afterwards. Read and fn run fused in one task per file: map_batches takes whole blocks
    (a batch_size, or fewer read tasks than Ray's minimum parallelism, would keep them apart and send
    every block through the object store; docs/BENCHMARKS.md, design notes), and the task cuts them into
    batch_rows slices for fn itself.
    """
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    saved_v2 = use_parquet_v1(ctx)
    saved_reservation = ctx.op_resource_reservation_enabled
    ctx.execution_options.preserve_order = preserve_order
    # One (fused) operator: Ray Data's per-operator reservation (half the cluster) only held it to half
    # the CPUs; without it both cores read (docs/BENCHMARKS.md, design notes).
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
