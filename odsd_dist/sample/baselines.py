"""Sampling baselines over the same score table (METHODS.md §4), with the APS machinery:
per-class quotas with hand-over and the streaming top-k, ranked by something simpler.

  random           N uniform: the N smallest seeded key hashes (one bucket)
  balanced-random  N/C per teacher class at random (quota + hand-over, seeded key hashes)
  maxprob          N/C per class by highest maxprob
  entropy-high     the N most uncertain rows (highest normalised entropy, one bucket)
  all              the whole pool, streamed straight to the selection file (see run_all_rows)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .columns import col_np
from .keyhash import key_uniform
from .passes import PassTimer, count_scanned, run_pass
from .quota import class_quotas
from .topk import SELECTION_ORDER, TopKMerger, per_class_topq, with_rank

PAYLOAD = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]
PER_CLASS = {"balanced-random": True, "maxprob": True, "random": False, "entropy-high": False}


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


def baseline_rank(batch: pa.Table, method: str, seed: int) -> np.ndarray:
    if method in ("random", "balanced-random"):
        return 1.0 - key_uniform(batch.column("key"), seed)  # larger is better
    if method == "maxprob":
        return col_np(batch, "maxprob", np.float64)
    if method == "entropy-high":
        return col_np(batch, "entropy", np.float64)
    raise ValueError(method)


def baseline_block(batch: pa.Table, method: str, seed: int, quotas: np.ndarray) -> pa.Table:
    rank = baseline_rank(batch, method, seed)
    cls = col_np(batch, "pred", np.int32) if PER_CLASS[method] else np.zeros(batch.num_rows, np.int32)
    count_scanned(batch.num_rows)
    return per_class_topq(with_rank(batch.select(PAYLOAD), cls, rank), quotas)


def run_baseline(method: str, files, rows: int, c: int, n: int, seed: int, batch_rows: int,
                 timer: PassTimer) -> tuple[pa.Table, dict]:
    """(candidates with PAYLOAD + _cls/_rank, info) for a top-k baseline."""
    if PER_CLASS[method]:
        counts = class_counts(files, c, batch_rows, timer, rows)
        quotas = class_quotas(n, counts)
        info = {"candidates": counts.tolist(), "quotas": quotas.tolist()}
    else:
        quotas = np.array([min(n, rows)], np.int64)
        info = {"quotas": quotas.tolist()}
    merger = TopKMerger(quotas, slack=0.25)
    cols = sorted(set(PAYLOAD) | ({"entropy"} if method == "entropy-high" else set()))
    timer.run(method, rows, run_pass(files, cols, baseline_block, dict(method=method, seed=seed, quotas=quotas), batch_rows),
              merger.add)
    return merger.result(sort_keys=SELECTION_ORDER), info
