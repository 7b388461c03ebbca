"""Adaptive Prototype Sampling (METHODS.md §1.2) as a few Ray Data passes with mergeable partials.

Pass plan (memory O(C*d + N) on the driver, never O(pool)):
  stats   one pass: per class counts, sum w*f (prototypes), sum f and sum f f^T (the pool mean and
          std of the prototype cosine for *any* later single-prototype set, so no extra pass per
          round), and the sums of maxprob and -energy; all as exact fixed-point int64 partials.
  round t one pass: score every row, keep each block's per-class top-quota; the driver merges
          (topk.TopKMerger). Rounds before the last carry the candidates' features so that the next
          prototypes (or k-means modes) come from the selected rows without another pass.
  rstats  only with k > 1 prototypes per class (cosine = max over modes, not a quadratic form) or
          when C*d^2 is too large to aggregate: one pass for the mean/std of the cosine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from .blocks import PassTimer, col_np, count_scanned, features_np, from_fixed, qsum, quantise, run_pass
from .config import APSConfig
from .quota import class_quotas
from .topk import TopKMerger, per_class_topq, with_rank

SECOND_MOMENT_LIMIT = 1 << 22  # C*d*d above this: no f f^T aggregate, an rstats pass per round instead
ROUND_PAYLOAD = ["key", "pred", "maxprob", "feature"]
FINAL_PAYLOAD = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]


def _pack(parts: dict) -> pa.Table:
    return pa.table({k: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), max(v.size, 1))
                     if v.size else pa.array([[]], pa.list_(pa.int64())) for k, v in parts.items()})


def _unpack_rows(table: pa.Table) -> list[dict]:
    out = []
    cols = {k: table.column(k).combine_chunks() for k in table.column_names}
    for i in range(table.num_rows):
        out.append({k: np.asarray(c[i].values.to_numpy(zero_copy_only=False), dtype=np.int64) for k, c in cols.items()})
    return out


# ----------------------------------------------------------------------------------------- stats pass


def _group(pred: np.ndarray, c: int):
    order = np.argsort(pred, kind="stable")
    counts = np.bincount(pred, minlength=c)[:c]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return order, counts, bounds


# fixed-point scales of the mergeable sums (value = int / scale); every row is quantised before summing
S_P, S_E, S_F, S_FF = 2.0 ** 20, 2.0 ** 12, 2.0 ** 12, 2.0 ** 24


def stats_block(batch: pa.Table, c: int, d: int, second: bool, weight: str, confident: Optional[float]) -> pa.Table:
    """Mergeable per-block sums (exact int64 fixed point) for z-scores and prototypes."""
    n = batch.num_rows
    pred = col_np(batch, "pred", np.int64)
    mp = col_np(batch, "maxprob", np.float64)
    ne = -col_np(batch, "energy", np.float64)
    f = features_np(batch, d)
    w = mp if weight == "maxprob" else np.ones(n)
    order, counts, bounds = _group(pred, c)
    qf = quantise(f, S_F)[order]  # integer-valued: products and sums below 2^53 are exact in float64
    qwf = quantise(f * w[:, None], S_F)[order]
    qw = quantise(w, S_P)[order]
    nz = counts > 0
    starts = bounds[:-1][nz]
    sum_f = np.zeros((c, d)); sum_wf = np.zeros((c, d)); sum_w = np.zeros(c)
    if n:
        sum_f[nz] = np.add.reduceat(qf, starts, axis=0)
        sum_wf[nz] = np.add.reduceat(qwf, starts, axis=0)
        sum_w[nz] = np.add.reduceat(qw, starts)
    parts = {
        "n": np.array([n]), "counts": counts.astype(np.int64),
        "mp": np.array([qsum(quantise(mp, S_P)), qsum(quantise(mp * mp, S_P))]),
        "ne": np.array([qsum(quantise(ne, S_E)), qsum(quantise(ne * ne, S_E))]),
        "sum_f": sum_f.astype(np.int64), "sum_wf": sum_wf.astype(np.int64),
        "sum_w": sum_w.astype(np.int64),
    }
    if confident is not None:
        cm = (mp >= confident)[order]
        sum_cwf = np.zeros((c, d)); sum_cw = np.zeros(c)
        for k in np.nonzero(nz)[0]:
            sl = slice(bounds[k], bounds[k + 1])
            m = cm[sl]
            if m.any():
                sum_cwf[k] = qwf[sl][m].sum(axis=0)
                sum_cw[k] = qw[sl][m].sum()
        parts["sum_cwf"], parts["sum_cw"] = sum_cwf.astype(np.int64), sum_cw.astype(np.int64)
    if second:
        m2 = np.zeros((c, d, d))
        for k in np.nonzero(nz)[0]:
            x = qf[bounds[k]: bounds[k + 1]]
            m2[k] = x.T @ x  # integers < 2^24 per product: exact for blocks below 2^29 rows
        parts["m2"] = m2.astype(np.int64)
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
    m2: Optional[np.ndarray]  # (C, d, d) or None

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
        """Pool mean/std of cos(f, mu_pred) for single prototypes, from sum f and sum f f^T."""
        mu = protos[:, 0, :].astype(np.float64)
        s1 = float(np.einsum("kd,kd->", mu, self.sum_f))
        s2 = float(np.einsum("kd,kde,ke->", mu, self.m2, mu))
        mean = s1 / self.n
        return mean, float(np.sqrt(max(s2 / self.n - mean * mean, 0.0)))


def _std(s, ss, n) -> float:
    m = s / n
    return float(np.sqrt(max(ss / n - m * m, 0.0)))


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0.0)


def stats_pass(files, c, d, cfg: APSConfig, batch_rows: int, timer: PassTimer, rows: int) -> PoolStats:
    second = c * d * d <= SECOND_MOMENT_LIMIT  # round 1 always has one prototype per class
    confident = cfg.confident_threshold if cfg.prototype_source == "confident" else None
    acc: dict = {}

    def consume(t: pa.Table):
        for part in _unpack_rows(t):
            for k, v in part.items():
                acc[k] = acc[k] + v if k in acc else v

    kwargs = dict(c=c, d=d, second=second, weight=cfg.prototype_weight, confident=confident)
    timer.run("stats", rows, run_pass(files, ["pred", "maxprob", "energy", "feature"], stats_block, kwargs, batch_rows), consume)
    n = int(acc["n"][0])
    mp, ne = from_fixed(acc["mp"], S_P), from_fixed(acc["ne"], S_E)
    return PoolStats(
        n=n, counts=acc["counts"], mp_mean=mp[0] / n, mp_std=_std(mp[0], mp[1], n), ne_mean=ne[0] / n,
        ne_std=_std(ne[0], ne[1], n), sum_f=from_fixed(acc["sum_f"], S_F).reshape(c, d),
        sum_wf=from_fixed(acc["sum_wf"], S_F).reshape(c, d), sum_w=from_fixed(acc["sum_w"], S_P),
        sum_cwf=from_fixed(acc["sum_cwf"], S_F).reshape(c, d) if "sum_cwf" in acc else None,
        sum_cw=from_fixed(acc["sum_cw"], S_P) if "sum_cw" in acc else None,
        m2=from_fixed(acc["m2"], S_FF).reshape(c, d, d) if "m2" in acc else None,
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


def rstats_block(batch: pa.Table, d: int, protos: np.ndarray) -> pa.Table:
    pred = col_np(batch, "pred", np.int64)
    r = cosine_to_prototype(features_np(batch, d), pred, protos)
    count_scanned(batch.num_rows)
    return _pack({"r": np.array([qsum(quantise(r, S_P)), qsum(quantise(r * r, S_P))]), "n": np.array([batch.num_rows])})


def rstats_pass(files, d, protos, batch_rows, timer, rows, name) -> tuple[float, float]:
    acc = {"r": np.zeros(2, np.int64), "n": np.zeros(1, np.int64)}

    def consume(t):
        for part in _unpack_rows(t):
            acc["r"] += part["r"]; acc["n"] += part["n"]

    timer.run(name, rows, run_pass(files, ["pred", "feature"], rstats_block, dict(d=d, protos=protos), batch_rows), consume)
    s = from_fixed(acc["r"], S_P); n = int(acc["n"][0])
    return s[0] / n, _std(s[0], s[1], n)


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
    info = {"candidates": stats.counts.tolist(), "quotas": quotas.tolist(), "rounds": []}
    cand = None
    for t in range(1, cfg.rounds + 1):
        last = t == cfg.rounds
        if protos.shape[1] == 1 and stats.m2 is not None:
            r_mean, r_std = stats.cosine_stats(protos)
        else:
            r_mean, r_std = rstats_pass(files, d, protos, batch_rows, timer, rows, f"rstats{t}")
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
