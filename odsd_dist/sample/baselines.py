"""Sampling baselines over the same score table (METHODS.md §4), with the APS machinery:
per-class quotas with hand-over and the streaming top-k, ranked by something simpler.

A baseline is a `Ranker` in RANKERS: a score per row (larger is kept) from some score-table columns,
taken per teacher class (N/C each, quotas with hand-over) or over the whole pool. A new one is one
`register(...)` call here; `sample.method` accepts every registered name (plus `aps` and `all`).

  random           N uniform: the N smallest seeded key hashes (one bucket)
  balanced-random  N/C per teacher class at random (quota + hand-over, seeded key hashes)
  maxprob          N/C per class by highest maxprob
  entropy-high     the N most uncertain rows (highest normalised entropy, one bucket)
  all              the whole pool, streamed straight to the selection file (sample/__init__.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from .columns import col_np
from .keyhash import key_uniform
from .passes import PassTimer, count_scanned, run_pass
from .quota import class_quotas
from .topk import SELECTION_ORDER, TopKMerger, per_class_topq, with_rank

PAYLOAD = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]


@dataclass(frozen=True)
class Ranker:
    per_class: bool  # N/C per teacher class (quotas with hand-over) rather than N over the pool
    columns: tuple[str, ...]  # score-table columns `rank` reads beyond PAYLOAD
    rank: Callable[[pa.Table, int], np.ndarray]  # (batch, seed) -> float64 per row, larger is kept


RANKERS: dict[str, Ranker] = {}


def register(name: str, ranker: Ranker) -> None:
    RANKERS[name] = ranker


def _hash_rank(batch: pa.Table, seed: int) -> np.ndarray:
    return 1.0 - key_uniform(batch.column("key"), seed)


register("random", Ranker(False, (), _hash_rank))
register("balanced-random", Ranker(True, (), _hash_rank))
register("maxprob", Ranker(True, (), lambda b, seed: col_np(b, "maxprob", np.float64)))
register("entropy-high", Ranker(False, ("entropy",), lambda b, seed: col_np(b, "entropy", np.float64)))

def counts_block(batch: pa.Table, c: int) -> pa.Table:
    count_scanned(batch.num_rows)
    pred = col_np(batch, "pred", np.int64)
    return pa.table({"counts": pa.FixedSizeListArray.from_arrays(pa.array(np.bincount(pred, minlength=c)[:c].astype(np.int64)), c)})


def class_counts(files, c: int, batch_rows: int, timer: PassTimer, rows: int) -> np.ndarray:
    acc = np.zeros(c, np.int64)

    def consume(t):
        nonlocal acc
        col = t.column("counts").combine_chunks()
        acc = acc + col.flatten().to_numpy().reshape(len(col), c).sum(axis=0)

    timer.run("counts", rows, run_pass(files, ["pred"], counts_block, dict(c=c), batch_rows), consume)
    return acc


def baseline_block(batch: pa.Table, ranker: Ranker, seed: int, quotas: np.ndarray) -> pa.Table:
    r = ranker  # the object, not its name: the pass's workers need not have run the registration
    cls = col_np(batch, "pred", np.int32) if r.per_class else np.zeros(batch.num_rows, np.int32)
    count_scanned(batch.num_rows)
    return per_class_topq(with_rank(batch.select(PAYLOAD), cls, r.rank(batch, seed)), quotas)


def run_baseline(method: str, files, rows: int, c: int, n: int, seed: int, batch_rows: int,
                 timer: PassTimer) -> tuple[pa.Table, dict]:
    """(candidates with PAYLOAD + _cls/_rank, info) for a top-k baseline."""
    if RANKERS[method].per_class:
        counts = class_counts(files, c, batch_rows, timer, rows)
        quotas = class_quotas(n, counts)
        info = {"candidates": counts.tolist(), "quotas": quotas.tolist()}
    else:
        quotas = np.array([min(n, rows)], np.int64)
        info = {"quotas": quotas.tolist()}
    merger = TopKMerger(quotas, slack=0.25)
    cols = sorted(set(PAYLOAD) | set(RANKERS[method].columns))
    timer.run(method, rows, run_pass(files, cols, baseline_block, dict(ranker=RANKERS[method], seed=seed, quotas=quotas), batch_rows),
              merger.add)
    return merger.result(sort_keys=SELECTION_ORDER), info
