"""Helpers for the operations tests (local multi-node Ray, Prometheus): free ports and a context
manager around cluster/local_cluster.py that always stops exactly the nodes it started. Shards and
teachers come from tests/fixtures.py."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "cluster")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import local_cluster  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port(span: int = 1700, start: int = 21000, stop: int = 31000, step: int = 1700) -> int:
    """A base port whose cluster ports (base .. base+span) look free: below the ephemeral range and
    above Ray's default worker ports (10002-19999), so other Rays on the machine do not collide."""
    import random

    bases = list(range(start, stop - span, step))
    random.Random(os.getpid()).shuffle(bases)
    for base in bases:
        probe = [base, base + 1, base + 2] + [base + 10 + 10 * i + j for i in range(3) for j in range(6)]
        probe += [base + 1000 + 200 * i for i in range(3)]
        if all(local_cluster._port_free(p) for p in probe) and not Path(f"/tmp/odsd-ray-{base}").exists():
            return base
    raise RuntimeError("no free port range for a local Ray cluster")


@contextlib.contextmanager
def local_ray_cluster(workers: int = 2, cpus_per_node: int = 2, env: dict | None = None):
    """Start a head + `workers` nodes on free ports; always stops exactly those processes afterwards."""
    spec = local_cluster.ClusterSpec(base_port=free_base_port(), workers=workers, cpus_per_node=cpus_per_node)
    env = dict(env or {}, **local_cluster.client_env(spec))  # this cluster's own auth token, for every client
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        try:
            yield spec, local_cluster.up(spec)
        finally:
            local_cluster.down(spec)
            if not os.environ.get("ODSD_KEEP_CLUSTER_LOGS"):
                shutil.rmtree(spec.temp_dir, ignore_errors=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
