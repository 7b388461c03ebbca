"""Session-wide pytest fixtures: synthetic shards (tests/fixtures.py) and one real local Ray.

Request `pool_shards`, `labelled_shards`, `labelled_grey_shards` or `ray_local` by name; each is
made once per test session. Tests never read ../shared.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):  # import odsd_dist, bench.synth and tests/fixtures without installing
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fixtures import make_labelled_shards, make_pool_shards  # noqa: E402


@pytest.fixture(scope="session")
def pool_shards(tmp_path_factory) -> dict:
    """2 pool shards x 40 entries, every damage kind (see make_pool_shards for the returned dict)."""
    return make_pool_shards(tmp_path_factory.mktemp("pool"), n_shards=2, per_shard=40, damage=True, seed=0)


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory) -> dict:
    """3 classes x 20 RGB 32x32 JPEGs in 1 shard + classes.json."""
    return make_labelled_shards(tmp_path_factory.mktemp("labelled"), n_classes=3, per_class=20, size=32, seed=1)


@pytest.fixture(scope="session")
def labelled_grey_shards(tmp_path_factory) -> dict:
    """3 classes x 10 grey 28x28 PNGs in 2 shards + classes.json (MNIST-style)."""
    return make_labelled_shards(tmp_path_factory.mktemp("labelled_grey"), n_classes=3, per_class=10, size=28,
                                channels=1, n_shards=2, seed=2)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session (2 CPUs, no dashboard), shut down at the end."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# Tests that start their own multi-node Ray cluster with token authentication. Ray caches the auth mode
# per process, so once they have run, a plain local `ray.init` in the same process fails with
# InvalidAuthToken. They run last here, and `.ci/test` gives them a pytest process of their own.
OPS_MODULES = ("test_cluster.py", "test_prometheus.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name in OPS_MODULES)  # stable: keeps the order within each group
