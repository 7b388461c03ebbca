"""Starting or joining Ray from the `ray` config section, the same way for every stage."""
from __future__ import annotations

import math
import os
from typing import Optional

import ray
import ray.data
from pydantic import Field

from . import console
from .section import Section


class RayConfig(Section):
    """The `ray` config section. Beside `init_ray` rather than in config.py, so that the stage runner can
    start Ray without importing the top-level config (which imports the stage packages' configs)."""

    address: Optional[str] = None  # None: start a local Ray; "auto" or ray://...: join a running cluster
    num_cpus: Optional[int] = Field(None, ge=1)
    namespace: str = "odsd"
    include_dashboard: bool = False


def threads_for(threads: int | None, cpus: float) -> int:
    """Torch threads of a process that reserved `cpus` Ray CPUs: `threads` when set, else the CPUs rounded up."""
    return threads or max(1, math.ceil(cpus))


def use_parquet_v1(ctx) -> bool:
    """Make a Ray Data DataContext read Parquet with the V1 reader; returns the previous `use_datasource_v2`.

    Every Parquet read of odsd (the sampling passes, the distill epoch feed) goes through here. V2, the
    default in Ray 2.60, lists files in extra tasks and starts a pool of footer-reader actors, each a new
    worker process, for every read: seconds that dwarf the read itself on odsd's tables (docs/BENCHMARKS.md,
    design notes).
    """
    old = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    return old


def init_ray(rc: RayConfig) -> None:
    """Join the cluster named by `ray.address` (or RAY_ADDRESS), else start a local one.

    Quiet unless verbose (odsd_dist/console.py): Ray's and Ray Data's console loggers show errors only,
    Ray Data draws no progress bars, and what worker processes print goes to the stage log;
    `odsd --verbose` (ODSD_VERBOSE=1) leaves all of it on the console.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    loud = console.verbose()
    console.quiet_libraries()  # before ray.init: its start-up and token-authentication lines
    forward = console.can_forward_worker_output()
    kwargs = dict(namespace=rc.namespace, ignore_reinit_error=True, log_to_driver=loud or forward)
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard, **kwargs)
    if forward:
        console.forward_worker_output()

    console.quiet_libraries()  # importing ray.data set up its logger anew
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = loud  # its execution plans are INFO records: in the stage log either way
    ctx.enable_operator_progress_bars = loud
