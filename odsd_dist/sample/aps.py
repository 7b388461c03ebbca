"""Adaptive Prototype Sampling (METHODS.md §1.2) as a few Ray Data passes with mergeable partials.

Pass plan (memory O(C*d + N + S*d) on the driver, never O(pool)):
  stats   one pass: per class counts, sum w*f (prototypes), sum f (pool mean feature), the sums of
          maxprob and -energy (exact fixed-point int64 partials), and a fixed sample of S rows
          (`stats_sample_rows`) chosen by a hash of each row's feature bits: the pool mean/std of the
          prototype cosine for *any* later prototype set comes from it, so no extra pass per round.
  round t one pass: score every row, keep each block's per-class top-quota; the driver merges
          (topk.TopKMerger). Rounds before the last carry the candidates' features so that the next
          prototypes (or k-means modes) come from the selected rows without another pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from .blocks import PassTimer, col_np, count_scanned, features_np, from_fixed, qsum, quantise, run_pass, row_hash
from .config import APSConfig
from .quota import class_quotas
from .topk import TopKMerger, per_class_topq, with_rank

ROUND_PAYLOAD = ["key", "pred", "maxprob", "feature"]
FINAL_PAYLOAD = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]
SUMMED = ("n", "counts", "mp", "ne", "sum_f", "sum_wf", "sum_w", "sum_cwf", "sum_cw")  # the rest is concatenated


def _pack(parts: dict) -> pa.Table:
    """One-row table, one list column per part (the part's dtype kept)."""
    return pa.table({k: pa.ListArray.from_arrays(pa.array([0, v.size], pa.int32()), pa.array(np.ascontiguousarray(v).reshape(-1)))
                     for k, v in parts.items()})


def _unpack_rows(table: pa.Table) -> list[dict]:
    cols = {k: table.column(k).combine_chunks() for k in table.column_names}
    return [{k: c[i].values.to_numpy(zero_copy_only=False) for k, c in cols.items()} for i in range(table.num_rows)]


# ----------------------------------------------------------------------------------------- stats pass


# fixed-point scales of the mergeable sums (value = int / scale); every row is quantised before summing
S_P, S_E, S_F = 2.0 ** 20, 2.0 ** 12, 2.0 ** 12


def _class_sums(onehot: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(C, ...) per-class sums of integer-valued float64 rows as int64: a GEMM with the 0/1 class matrix is
    exact (every partial sum is an integer below 2^53), so the result does not depend on BLAS's order."""
    return (onehot @ q).astype(np.int64)


def stats_block(batch: pa.Table, c: int, d: int, weight: str, confident: Optional[float],
                keep_below: Optional[int]) -> pa.Table:
    """Mergeable per-block sums (exact int64 fixed point) and the block's rows of the pool's cosine sample."""
    n = batch.num_rows
    pred = col_np(batch, "pred", np.int64)
    mp = col_np(batch, "maxprob", np.float64)
    ne = -col_np(batch, "energy", np.float64)
    f = features_np(batch, d)
    w = mp if weight == "maxprob" else np.ones(n)
    onehot = np.zeros((c, n))
    onehot[pred, np.arange(n)] = 1.0
    qwf = quantise(f * w[:, None], S_F)
    qw = quantise(w, S_P)
    parts = {
        "n": np.array([n], np.int64), "counts": np.bincount(pred, minlength=c)[:c].astype(np.int64),
        "mp": np.array([qsum(quantise(mp, S_P)), qsum(quantise(mp * mp, S_P))], np.int64),
        "ne": np.array([qsum(quantise(ne, S_E)), qsum(quantise(ne * ne, S_E))], np.int64),
        "sum_f": _class_sums(onehot, quantise(f, S_F)), "sum_wf": _class_sums(onehot, qwf),
        "sum_w": _class_sums(onehot, qw),
    }
    if confident is not None:
        conf = onehot * (mp >= confident)[None, :]
        parts["sum_cwf"], parts["sum_cw"] = _class_sums(conf, qwf), _class_sums(conf, qw)
    raw = batch.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, d)
    # the cosine sample: rows picked by content (not by block or arrival order), all when keep_below is None
    picked = np.ones(n, bool) if keep_below is None else row_hash(raw) < np.uint64(keep_below)
    parts["sample_pred"] = pred[picked]
    parts["sample_f"] = raw[picked].reshape(-1)
    count_scanned(n)
    return _pack(parts)


@dataclass
class PoolStats:
    n: int
    counts: np.ndarray  # int64[C]
    mp_mean: float
    mp_std: float
    ne_mean: float
    ne_std: float
    sum_f: np.ndarray  # (C, d)
    sum_wf: np.ndarray
    sum_w: np.ndarray
    sum_cwf: Optional[np.ndarray]
    sum_cw: Optional[np.ndarray]
    sample_pred: np.ndarray  # int64[S]: the cosine sample (every row when the pool has <= stats_sample_rows)
    sample_f: np.ndarray  # float32 (S, d)

    def mean_feature(self) -> np.ndarray:
        """The pool's mean feature (d,)."""
        return self.sum_f.sum(axis=0) / max(self.n, 1)

    def prototypes(self, source: str, center: bool) -> np.ndarray:
        """Round-1 prototypes (C, 1, d): normalised confidence-weighted class means, minus the pool mean if center."""
        s, w = self.sum_wf, self.sum_w
        if source == "confident" and self.sum_cwf is not None:
            has = np.linalg.norm(self.sum_cwf, axis=1) > 0
            s = np.where(has[:, None], self.sum_cwf, self.sum_wf)
            w = np.where(has, self.sum_cw, self.sum_w)
        if center:  # sum w (f - m) = sum w f - (sum w) m
            s = s - w[:, None] * self.mean_feature()[None, :]
        return _normalise(s)[:, None, :]

    def cosine_stats(self, protos: np.ndarray) -> tuple[float, float]:
        """Pool mean/std of cos(f, mu_pred) (max over a class's modes), measured on the cosine sample.

        The per-row cosines are exact and elementwise and their sums fixed point, so the figures do not
        depend on the order the sample's rows arrived in."""
        r = cosine_to_prototype(self.sample_f, self.sample_pred, protos)
        m = max(len(r), 1)
        s = from_fixed(np.array([qsum(quantise(r, S_P)), qsum(quantise(r * r, S_P))]), S_P)
        return s[0] / m, _std(s[0], s[1], m)


def _std(s, ss, n) -> float:
    m = s / n
    return float(np.sqrt(max(ss / n - m * m, 0.0)))


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0.0)


def stats_pass(files, c, d, cfg: APSConfig, batch_rows: int, timer: PassTimer, rows: int) -> PoolStats:
    confident = cfg.confident_threshold if cfg.prototype_source == "confident" else None
    frac = cfg.stats_sample_rows / max(rows, 1)
    keep_below = None if frac >= 1 else int(frac * 2.0 ** 64)
    acc: dict = {}
    sample: dict = {"sample_pred": [], "sample_f": []}

    def consume(t: pa.Table):
        for part in _unpack_rows(t):
            for k, v in part.items():
                if k in sample:
                    sample[k].append(v)
                else:
                    acc[k] = acc[k] + v if k in acc else v.astype(np.int64)

    kwargs = dict(c=c, d=d, weight=cfg.prototype_weight, confident=confident, keep_below=keep_below)
    timer.run("stats", rows, run_pass(files, ["pred", "maxprob", "energy", "feature"], stats_block, kwargs, batch_rows), consume)
    n = int(acc["n"][0])
    mp, ne = from_fixed(acc["mp"], S_P), from_fixed(acc["ne"], S_E)
    sp = np.concatenate(sample["sample_pred"]).astype(np.int64) if sample["sample_pred"] else np.zeros(0, np.int64)
    sf = np.concatenate(sample["sample_f"]) if sample["sample_f"] else np.zeros(0, np.float16)
    return PoolStats(
        n=n, counts=acc["counts"], mp_mean=mp[0] / n, mp_std=_std(mp[0], mp[1], n), ne_mean=ne[0] / n,
        ne_std=_std(ne[0], ne[1], n), sum_f=from_fixed(acc["sum_f"], S_F).reshape(c, d),
        sum_wf=from_fixed(acc["sum_wf"], S_F).reshape(c, d), sum_w=from_fixed(acc["sum_w"], S_P),
        sum_cwf=from_fixed(acc["sum_cwf"], S_F).reshape(c, d) if "sum_cwf" in acc else None,
        sum_cw=from_fixed(acc["sum_cw"], S_P) if "sum_cw" in acc else None,
        sample_pred=sp, sample_f=sf.astype(np.float32).reshape(-1, d),
    )


# --------------------------------------------------------------------------------------- scoring


def cosine_to_prototype(f: np.ndarray, pred: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """cos(f, mu_pred) (max over the class's modes) in float64, accumulated dimension by dimension.

    Only elementwise operations: numpy's SIMD row reductions round differently depending on the
    array's memory alignment, i.e. on how Ray Data cut the blocks, which broke byte-identical reruns.
    """
    r = None
    fT = np.ascontiguousarray(f.T)
    for j in range(protos.shape[1]):
        muT = np.ascontiguousarray(protos[:, j, :].astype(np.float64).T)  # (d, C)
        rj = np.zeros(len(pred))
        for i in range(fT.shape[0]):
            rj += fT[i] * muT[i][pred]
        r = rj if r is None else np.maximum(r, rj)
    return r if r is not None else np.zeros(len(pred))


def aps_score(batch: pa.Table, d: int, protos: np.ndarray, z: dict) -> tuple[np.ndarray, np.ndarray]:
    """(score float32, cosine float32) for each row of the batch."""
    pred = col_np(batch, "pred", np.int64)
    f = features_np(batch, d)
    r = cosine_to_prototype(f, pred, protos)
    c = col_np(batch, "maxprob", np.float64)
    e = -col_np(batch, "energy", np.float64)
    s = (z["a_c"] * (c - z["mp_mean"]) / z["mp_std"] + z["a_r"] * (r - z["r_mean"]) / z["r_std"]
         + z["a_e"] * (e - z["ne_mean"]) / z["ne_std"])
    return s.astype(np.float32), r.astype(np.float32)


def select_block(batch: pa.Table, d: int, protos: np.ndarray, z: dict, quotas: np.ndarray, payload: list) -> pa.Table:
    score, _ = aps_score(batch, d, protos, z)
    pred = col_np(batch, "pred", np.int32)
    t = with_rank(batch.select(payload), pred, score.astype(np.float64))
    count_scanned(batch.num_rows)
    return per_class_topq(t, quotas)


# ------------------------------------------------------------------------------ next-round prototypes


def _kmeans(x: np.ndarray, w: np.ndarray, m: int, iters: int, seed: int) -> np.ndarray:
    """Spherical weighted k-means (cosine), deterministic given the row order and seed (x: centred if center)."""
    rng = np.random.default_rng(seed)
    init = rng.choice(len(x), size=m, replace=len(x) < m)
    cent = x[init].copy()
    for _ in range(iters):
        assign = np.argmax(x @ cent.T, axis=1)
        for j in range(m):
            sel = assign == j
            if sel.any():
                cent[j] = (x[sel] * w[sel, None]).sum(axis=0)
        cent = _normalise(cent)
    return cent


def next_prototypes(cand: pa.Table, prev: np.ndarray, d: int, cfg: APSConfig, seed: int,
                    mean: Optional[np.ndarray] = None) -> np.ndarray:
    """Prototypes from the rows just selected (sorted by class, rank, key); a class with none keeps its old one.

    With `mean` (the pool's mean feature) the selected features are centred on it first."""
    c = prev.shape[0]
    m = cfg.prototypes_per_class
    pred = col_np(cand, "pred", np.int64)
    f = features_np(cand, d)
    if mean is not None:
        f = (f.astype(np.float64) - mean[None, :]).astype(np.float32)
    w = col_np(cand, "maxprob", np.float32) if cfg.prototype_weight == "maxprob" else np.ones(len(pred), np.float32)
    out = np.repeat(prev[:, :1, :], m, axis=1) if prev.shape[1] != m else prev.copy()
    for k in range(c):
        sel = pred == k
        if not sel.any():
            continue
        if m == 1:
            out[k, 0] = _normalise((f[sel].astype(np.float64) * w[sel, None]).sum(axis=0))
        else:
            out[k] = _kmeans(f[sel], w[sel], m, cfg.kmeans_iters, seed * 1000 + k)
    return out


# ----------------------------------------------------------------------------------------- driver


def run_aps(files, rows: int, c: int, d: int, n: int, cfg: APSConfig, seed: int, batch_rows: int,
            timer: PassTimer) -> tuple[pa.Table, dict]:
    """APS over the score files: (candidates sorted by class/score/key with FINAL_PAYLOAD + _cls/_rank, info)."""
    stats = stats_pass(files, c, d, cfg, batch_rows, timer, rows)
    quotas = class_quotas(n, stats.counts)
    protos = stats.prototypes(cfg.prototype_source, cfg.center)
    mean = stats.mean_feature() if cfg.center else None
    info = {"candidates": stats.counts.tolist(), "quotas": quotas.tolist(), "cosine_sample_rows": len(stats.sample_pred),
            "rounds": []}
    cand = None
    for t in range(1, cfg.rounds + 1):
        last = t == cfg.rounds
        r_mean, r_std = stats.cosine_stats(protos)
        z = {"a_c": cfg.a_c, "a_r": cfg.a_r, "a_e": cfg.a_e, "mp_mean": stats.mp_mean,
             "mp_std": max(stats.mp_std, 1e-12), "ne_mean": stats.ne_mean, "ne_std": max(stats.ne_std, 1e-12),
             "r_mean": r_mean, "r_std": max(r_std, 1e-12)}
        payload = FINAL_PAYLOAD if last else ROUND_PAYLOAD
        merger = TopKMerger(quotas, slack=0.25)
        kwargs = dict(d=d, protos=protos, z=z, quotas=quotas, payload=payload)
        timer.run(f"select{t}", rows, run_pass(files, sorted(set(payload) | {"pred", "maxprob", "energy", "feature"}),
                                                select_block, kwargs, batch_rows), merger.add)
        cand = merger.result()
        info["rounds"].append({"round": t, "z": {k: round(float(v), 6) for k, v in z.items()},
                               "prototypes": int(protos.shape[1]), "buffer_peak_rows": merger.peak_rows})
        if not last:
            protos = next_prototypes(cand, protos, d, cfg, seed, mean)
    info["z"] = info["rounds"][-1]["z"]
    return cand, info
