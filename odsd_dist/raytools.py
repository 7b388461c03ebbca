"""Starting or joining Ray from the `ray` config section, the same way for every stage."""
from __future__ import annotations

import os

from .config import RayConfig


def init_ray(rc: RayConfig) -> None:
    """Join the cluster named by `ray.address` (or RAY_ADDRESS), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(namespace=rc.namespace, ignore_reinit_error=True, log_to_driver=True)
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
