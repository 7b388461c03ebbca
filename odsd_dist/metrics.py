"""Every Prometheus metric of odsd-dist, defined in one place.

Names follow odsd_<stage>_<what>_<unit>. Inside Ray tasks and actors they are exported through
`ray.util.metrics` (Ray's metrics agent adds the `ray_` prefix, so Prometheus sees e.g.
`ray_odsd_score_images_read_total`); in plain processes through `prometheus_client`
(`serve_metrics(port)` starts the HTTP endpoint).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import prometheus_client as pc
from ray.util import metrics as rm

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


@dataclass(frozen=True)
class MetricDef:
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = field(default=tuple(LATENCY_BUCKETS))


METRICS: dict[str, MetricDef] = {
    # score
    "odsd_score_images_read_total": MetricDef("counter", "Pool entries read from shards"),
    "odsd_score_images_scored_total": MetricDef("counter", "Pool images scored by the teacher"),
    "odsd_score_images_damaged_total": MetricDef("counter", "Damaged pool entries quarantined, by reason", ("reason",)),
    "odsd_score_batch_latency_seconds": MetricDef("histogram", "Teacher forward latency per batch"),
    "odsd_score_shards_done_total": MetricDef("counter", "Pool shards fully scored and written"),
    "odsd_score_duplicate_keys": MetricDef("gauge", "Pool entries whose key occurred earlier in the pool (quarantined)"),
    # sample
    "odsd_sample_rows_scanned_total": MetricDef("counter", "Score-table rows scanned by sampling"),
    "odsd_sample_selected_per_class": MetricDef("gauge", "Images selected per teacher class", ("cls",)),
    "odsd_sample_selection_seconds": MetricDef("gauge", "Wall time of the last selection"),
    # distill
    "odsd_distill_step_seconds": MetricDef("histogram", "Optimizer step wall time"),
    "odsd_distill_samples_per_second": MetricDef("gauge", "Training throughput per worker", ("rank",)),
    "odsd_distill_loss": MetricDef("gauge", "Loss terms of the last step", ("term",)),
    "odsd_distill_stat": MetricDef("gauge", "Training statistics that are not losses: the learning rate, kd3's kept fraction", ("term",)),
    "odsd_eval_top1_ratio": MetricDef("gauge", "Student top-1 accuracy on the evaluation shards", ("which",)),
}

_lock = threading.Lock()
_ray_cache: dict[str, object] = {}
_prom_cache: dict[str, object] = {}


def _check(name: str) -> MetricDef:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}: define it in odsd_dist/metrics.py") from None


def ray_metric(name: str):
    """The ray.util.metrics object for `name` (one per process), for use inside Ray tasks/actors."""
    d = _check(name)
    with _lock:
        m = _ray_cache.get(name)
        if m is None:
            # Ray appends nothing to counter names: keep the Prometheus-style _total in the name.
            if d.kind == "counter":
                m = rm.Counter(name, description=d.help, tag_keys=d.tags)
            elif d.kind == "gauge":
                m = rm.Gauge(name, description=d.help, tag_keys=d.tags)
            else:
                m = rm.Histogram(name, description=d.help, boundaries=list(d.buckets), tag_keys=d.tags)
            _ray_cache[name] = m
        return m


def prom_metric(name: str):
    """The prometheus_client object for `name`, for plain (non-Ray) processes."""
    d = _check(name)
    with _lock:
        m = _prom_cache.get(name)
        if m is None:
            if d.kind == "counter":
                m = pc.Counter(name.removesuffix("_total"), d.help, list(d.tags))
            elif d.kind == "gauge":
                m = pc.Gauge(name, d.help, list(d.tags))
            else:
                m = pc.Histogram(name, d.help, list(d.tags), buckets=list(d.buckets))
            _prom_cache[name] = m
        return m


_served: dict[int, int] = {}


def serve_metrics(port: Optional[int]) -> Optional[int]:
    """Start prometheus_client's HTTP endpoint on `port` (0 = any free port); returns the bound port.

    Idempotent per process, so every stage may call it (`odsd run` runs them all in one process)."""
    if port is None:
        return None
    with _lock:
        if port in _served:
            return _served[port]

        server, _ = pc.start_http_server(port)
        _served[port] = server.server_port
        return server.server_port
