"""Adaptive Prototype Sampling (METHODS.md §1.2) as two Ray Data passes with mergeable partials.

Pass plan (memory O(C*d + N + S*d + C*min_rows_per_class*d) on the driver, never O(pool)):
  stats   per class counts, sum w*f (round-1 prototypes), sum f (pool mean feature), the sums of maxprob
          and -energy (exact fixed-point int64 partials), and a fixed sample of ~S rows
          (`stats_sample_rows`, picked by a hash of each row's feature bits, so the same rows whatever
          the block boundaries; every row when |pool| <= S).
  rounds  on the driver, on the sample: the pool mean/std of the prototype cosine for each round's
          prototypes, each class's top share of the sample (its quota / its pool count) and, from those
          rows, the next round's prototypes (or k-means modes). With |pool| <= S this is the exact
          per-class top-quota of the pool; above, a uniform sample of it.
  refine  (only when a class's top share of the sample is under aps.min_rows_per_class rows, e.g. C = 1,000
          over 10^9 rows) one pass per adaptive round: the class's best min(quota, min_rows_per_class)
          rows of the whole pool under that round's scores (a per-class top-k like select, with features),
          from which its next prototypes come. Memory O(C * min_rows_per_class * d).
  select  one pass: score every row with the last round's prototypes, drop rows below a per-class
          floor set from the sample (a margin below the estimated threshold, so ~1.1 N rows reach the
          driver instead of the pool), keep each block's per-class top-quota; the driver merges
          (topk.TopKMerger). A class that ends with fewer rows than its quota had its floor too high:
          the pass is rerun without floors, so the result is always the exact top-quota.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .columns import col_np, f64_chunks, features_f16, features_np
from .fixedpoint import from_fixed, qsum, quantise
from .keyhash import row_hash
from .passes import PassTimer, count_scanned, run_pass
from .config import APSConfig
from .quota import class_quotas
from .topk import CLS, RANK, SELECTION_ORDER, TopKMerger, per_class_topq, with_rank

FINAL_PAYLOAD = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]


def _pack(parts: dict) -> pa.Table:
    """One-row table, one list column per part (the part's dtype kept)."""
    return pa.table({k: pa.ListArray.from_arrays(pa.array([0, v.size], pa.int32()), pa.array(np.ascontiguousarray(v).reshape(-1)))
                     for k, v in parts.items()})


def _unpack_rows(table: pa.Table) -> list[dict]:
    cols = {k: table.column(k).combine_chunks() for k in table.column_names}
    return [{k: c[i].values.to_numpy(zero_copy_only=False) for k, c in cols.items()} for i in range(table.num_rows)]


# ----------------------------------------------------------------------------------------- stats pass


# Fixed-point scales of the mergeable sums (value = int / scale). Every row's contribution sits on a fixed grid
# before summing, so the totals are exact and independent of block cuts and merge order. Float16 features
# are multiples of 2^-24 (|f| <= 1) and weights are rounded to multiples of 2^-12, so the per-class GEMMs
# below are exact in float64: sum f on the 2^-24 grid, sum w f on the 2^-36 grid, over at most 2^16 rows at
# a time (every partial sum then fits float64's 53 bits; f64_chunks' 8192 rows are well below). The driver adds
# the blocks' int64 sums as Python integers (no overflow however large the pool).
S_P, S_E, S_W, S_F16, S_WF = 2.0 ** 20, 2.0 ** 12, 2.0 ** 12, 2.0 ** 24, 2.0 ** 36


def _class_sums(onehot: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
    """(C, ...) per-class sums, as int64 at `scale`, of rows x weighted by a (C, n) class matrix (0/1, or a
    row's weight in its class's row) whose products with x lie on the 1/scale grid: an exact GEMM (callers
    keep n small enough for every partial sum to fit 53 bits), so BLAS's summation order cannot matter."""
    return ((onehot @ x) * scale).astype(np.int64)


def stats_block(batch: pa.Table, c: int, d: int, weight: str, confident: Optional[float],
                keep_below: Optional[int]) -> pa.Table:
    """Mergeable per-block sums (exact int64 fixed point) and the block's rows of the pool's cosine sample."""
    n = batch.num_rows
    pred = col_np(batch, "pred", np.int64)
    mp = col_np(batch, "maxprob", np.float64)
    ne = -col_np(batch, "energy", np.float64)
    raw = features_f16(batch, d)  # the sample keeps these bits
    w = quantise(mp if weight == "maxprob" else np.ones(n), S_W) / S_W
    rows = np.arange(n)
    onehot, onehot_w = np.zeros((c, n)), np.zeros((c, n))
    onehot[pred, rows], onehot_w[pred, rows] = 1.0, w
    classes = {"sum_f": (onehot, S_F16), "sum_wf": (onehot_w, S_WF)}
    if confident is not None:
        classes["sum_cwf"] = (onehot_w * (mp >= confident)[None, :], S_WF)
    parts = {
        "n": np.array([n], np.int64), "counts": np.bincount(pred, minlength=c)[:c].astype(np.int64),
        "mp": np.array([qsum(quantise(mp, S_P)), qsum(quantise(mp * mp, S_P))], np.int64),
        "ne": np.array([qsum(quantise(ne, S_E)), qsum(quantise(ne * ne, S_E))], np.int64),
        "sum_w": _class_sums(onehot_w, np.ones(n), S_W),
        **{k: np.zeros((c, d), np.int64) for k in classes},
    }
    if confident is not None:
        parts["sum_cw"] = _class_sums(classes["sum_cwf"][0], np.ones(n), S_W)
    for i, f in f64_chunks(raw):  # float16 -> float64 is exact
        for k, (m, scale) in classes.items():
            parts[k] += _class_sums(m[:, i:i + len(f)], f, scale)
    # the cosine sample: rows picked by content (not by block or arrival order), all when keep_below is None
    picked = np.ones(n, bool) if keep_below is None else row_hash(raw) < np.uint64(keep_below)
    parts["sample_pred"], parts["sample_f"] = pred[picked], raw[picked].reshape(-1)
    parts["sample_mp"], parts["sample_ne"] = mp[picked], ne[picked]
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
    # the sample (every row when the pool has <= stats_sample_rows), in a canonical order (by content)
    sample_pred: np.ndarray  # int64[S]
    sample_f: np.ndarray  # float32 (S, d)
    sample_mp: np.ndarray  # float64[S]: maxprob
    sample_ne: np.ndarray  # float64[S]: -energy

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

    def sample_cosine(self, protos: np.ndarray) -> np.ndarray:
        """cos(f, mu_pred) (max over a class's modes) of every sample row."""
        return cosine_to_prototype(self.sample_f, self.sample_pred, protos)

    def sample_scores(self, r: np.ndarray, z: dict) -> np.ndarray:
        """The APS score of every sample row from its cosines r (float32, as select_block scores pool rows)."""
        return combine(z, self.sample_mp, r, self.sample_ne)

    def sample_order(self, score: np.ndarray) -> list[np.ndarray]:
        """Per class, the indices of its sample rows, best score first (ties: canonical order)."""
        out = []
        for k in range(len(self.counts)):
            idx = np.flatnonzero(self.sample_pred == k)
            out.append(idx[np.argsort(-score[idx], kind="stable")])
        return out

    def sample_share(self, quotas: np.ndarray) -> np.ndarray:
        """Per class, the quota's expected share of the class's sample rows: quota_k * sampled_k / count_k."""
        m = np.bincount(self.sample_pred, minlength=len(self.counts))[: len(self.counts)]
        return quotas * m / np.maximum(self.counts, 1)


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
    sample: dict = {"sample_pred": [], "sample_f": [], "sample_mp": [], "sample_ne": []}

    def consume(t: pa.Table):
        for part in _unpack_rows(t):
            for k, v in part.items():
                if k in sample:
                    sample[k].append(v)
                else:
                    acc[k] = acc[k] + v.astype(object) if k in acc else v.astype(object)  # Python ints: exact

    kwargs = dict(c=c, d=d, weight=cfg.prototype_weight, confident=confident, keep_below=keep_below)
    timer.run("stats", rows, run_pass(files, ["pred", "maxprob", "energy", "feature"], stats_block, kwargs, batch_rows), consume)
    n = int(acc["n"][0])
    mp, ne = from_fixed(acc["mp"], S_P), from_fixed(acc["ne"], S_E)
    sp, sf, smp, sne = (np.concatenate(sample[k]) for k in ("sample_pred", "sample_f", "sample_mp", "sample_ne"))
    sf = sf.reshape(-1, d)
    # a canonical order, whatever order the blocks arrived in: by content hash, then the values themselves
    order = np.lexsort((sne, smp, sp, row_hash(sf)))
    sp, sf, smp, sne = sp[order].astype(np.int64), sf[order].astype(np.float32), smp[order], sne[order]
    return PoolStats(
        n=n, counts=acc["counts"].astype(np.int64), mp_mean=mp[0] / n, mp_std=_std(mp[0], mp[1], n), ne_mean=ne[0] / n,
        ne_std=_std(ne[0], ne[1], n), sum_f=from_fixed(acc["sum_f"], S_F16).reshape(c, d),
        sum_wf=from_fixed(acc["sum_wf"], S_WF).reshape(c, d), sum_w=from_fixed(acc["sum_w"], S_W),
        sum_cwf=from_fixed(acc["sum_cwf"], S_WF).reshape(c, d) if "sum_cwf" in acc else None,
        sum_cw=from_fixed(acc["sum_cw"], S_W) if "sum_cw" in acc else None,
        sample_pred=sp, sample_f=sf, sample_mp=smp, sample_ne=sne,
    )


# --------------------------------------------------------------------------------------- scoring


# Prototypes are rounded to a 2^-20 grid before the cosine. The features are float16 (multiples of 2^-24, |f| <= 1),
# so every product f_i mu_i is a multiple of 2^-44 and every partial sum (|.| <= |f||mu| <= ~1) is exact in
# float64: a BLAS product gives the same bits whatever its summation order, which depends on the array's
# memory alignment, i.e. on how Ray Data cut the blocks (byte-identical reruns need that).
S_MU = 2.0 ** 20
GROUP_ABOVE = 16  # more than this many prototype columns (C x modes): one small GEMM per class


def cosine_to_prototype(f: np.ndarray, pred: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """cos(f, mu_pred) (max over the class's modes) in float64 for float16-valued features f (n, d)."""
    n, (c, m, d) = len(pred), protos.shape
    if n == 0 or m == 0:
        return np.zeros(n)
    mu = np.round(np.asarray(protos, dtype=np.float64) * S_MU) / S_MU  # (C, m, d)
    r = np.zeros(n)
    if c * m <= GROUP_ABOVE:
        cols = mu.reshape(c * m, d).T
        for i, x in f64_chunks(f):
            r[i:i + len(x)] = (x @ cols).reshape(len(x), c, m)[np.arange(len(x)), pred[i:i + len(x)]].max(axis=1)
        return r
    order = np.argsort(pred, kind="stable")
    bounds = np.searchsorted(pred[order], np.arange(c + 1))
    for k in np.flatnonzero(np.diff(bounds)):
        rows = order[bounds[k]:bounds[k + 1]]
        r[rows] = (np.asarray(f[rows], dtype=np.float64) @ mu[k].T).max(axis=1)  # one class's rows at a time
    return r


def combine(z: dict, c: np.ndarray, r: np.ndarray, e: np.ndarray) -> np.ndarray:
    """score = a_c z(maxprob) + a_r z(cosine) + a_e z(-energy), float32."""
    s = (z["a_c"] * (c - z["mp_mean"]) / z["mp_std"] + z["a_r"] * (r - z["r_mean"]) / z["r_std"]
         + z["a_e"] * (e - z["ne_mean"]) / z["ne_std"])
    return s.astype(np.float32)


def select_block(batch: pa.Table, d: int, protos: np.ndarray, z: dict, quotas: np.ndarray, floors: np.ndarray,
                 payload: list) -> pa.Table:
    """The block's per-class top-quota among its rows scoring at least their class's floor."""
    pred = col_np(batch, "pred", np.int64)
    r = cosine_to_prototype(features_f16(batch, d), pred, protos)
    score = combine(z, col_np(batch, "maxprob", np.float64), r, -col_np(batch, "energy", np.float64))
    keep = np.flatnonzero(score >= floors[pred])
    count_scanned(batch.num_rows)
    t = batch.select(payload)
    t = t.take(pa.array(keep)) if len(keep) < batch.num_rows else t
    return per_class_topq(with_rank(t, pred[keep].astype(np.int32), score[keep].astype(np.float64)), quotas)


def select_floors(order: list[np.ndarray], score: np.ndarray, share: np.ndarray, quotas: np.ndarray,
                  counts: np.ndarray) -> np.ndarray:
    """Per class, a score floor below the estimated quota-th best pool score (-inf: keep every row).

    The sample's rank of the threshold is share_k; the floor sits at rank 1.1 share_k + 4 sqrt(share_k) + 16,
    some 4 standard deviations of the sampling error below it."""
    floors = np.full(len(quotas), -np.inf, np.float32)
    for k, idx in enumerate(order):
        if quotas[k] >= counts[k]:
            continue
        j = int(np.ceil(1.1 * share[k] + 4 * np.sqrt(share[k]) + 16))
        if j < len(idx):
            floors[k] = score[idx[j]]
    return floors


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


def next_prototypes(pred: np.ndarray, f: np.ndarray, w: np.ndarray, prev: np.ndarray, cfg: APSConfig, seed: int,
                    mean: Optional[np.ndarray] = None) -> np.ndarray:
    """Prototypes from the rows just selected (in a canonical order); a class with none keeps its old one.

    With `mean` (the pool's mean feature) the selected features are centred on it first."""
    c = prev.shape[0]
    m = cfg.prototypes_per_class
    if mean is not None:
        f = (f.astype(np.float64) - mean[None, :]).astype(np.float32)
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


def _z(cfg: APSConfig, stats: PoolStats, r: np.ndarray) -> dict:
    """The z-score constants; the cosine's pool mean/std are measured on the sample's cosines r.

    The per-row cosines are exact (cosine_to_prototype) and their sums fixed point."""
    m = max(len(r), 1)
    s = from_fixed(np.array([qsum(quantise(r, S_P)), qsum(quantise(r * r, S_P))]), S_P)
    r_mean, r_std = s[0] / m, _std(s[0], s[1], m)
    return {"a_c": cfg.a_c, "a_r": cfg.a_r, "a_e": cfg.a_e, "mp_mean": stats.mp_mean,
            "mp_std": max(stats.mp_std, 1e-12), "ne_mean": stats.ne_mean, "ne_std": max(stats.ne_std, 1e-12),
            "r_mean": r_mean, "r_std": max(r_std, 1e-12)}


def run_aps(files, rows: int, c: int, d: int, n: int, cfg: APSConfig, seed: int, batch_rows: int,
            timer: PassTimer) -> tuple[pa.Table, dict]:
    """APS over the score files: (candidates with FINAL_PAYLOAD + _cls/_rank in SELECTION_ORDER, info)."""
    stats = stats_pass(files, c, d, cfg, batch_rows, timer, rows)
    quotas = class_quotas(n, stats.counts)
    protos = stats.prototypes(cfg.prototype_source, cfg.center)
    mean = stats.mean_feature() if cfg.center else None
    share = stats.sample_share(quotas)
    w = stats.sample_mp if cfg.prototype_weight == "maxprob" else np.ones(len(stats.sample_pred))
    info = {"candidates": stats.counts.tolist(), "quotas": quotas.tolist(), "sample_rows": len(stats.sample_pred),
            "rounds": []}
    for t in range(1, cfg.rounds + 1):
        r = stats.sample_cosine(protos)
        z = _z(cfg, stats, r)
        score = stats.sample_scores(r, z)
        order = stats.sample_order(score)
        info["rounds"].append({"round": t, "z": {k: round(float(v), 6) for k, v in z.items()},
                               "prototypes": int(protos.shape[1])})
        if t < cfg.rounds:  # the next prototypes, from each class's top share of the sample
            take = np.array([int(round(share[k])) for k in range(c)], np.int64)
            need = refine_rows(take, quotas, stats.counts, cfg.min_rows_per_class)
            take[need > 0] = 0  # those classes take their rows from the refine pass instead
            top = np.concatenate([idx[: take[k]] for k, idx in enumerate(order)]) if order else np.zeros(0, int)
            top = np.sort(top)  # canonical order
            pred_t, f_t, w_t = stats.sample_pred[top], stats.sample_f[top], w[top]
            if need.any():
                got = _refine(files, rows, d, protos, z, need, order, score, stats, batch_rows, timer, f"refine{t}")
                pred_t = np.concatenate([pred_t, col_np(got, "pred", np.int64)])
                f_t = np.concatenate([f_t, features_np(got, d)])
                gw = col_np(got, "maxprob", np.float64) if cfg.prototype_weight == "maxprob" else np.ones(got.num_rows)
                w_t = np.concatenate([w_t, gw])
            new = next_prototypes(pred_t, f_t, w_t, protos, cfg, seed, mean)
            used = np.bincount(pred_t, minlength=c)[:c]
            old = protos if protos.shape == new.shape else np.repeat(protos[:, :1], new.shape[1], axis=1)
            moved = int(np.any(new != old, axis=(1, 2)).sum())
            info["rounds"][-1].update(rows_per_class=used.tolist(), refined_classes=int((need > 0).sum()),
                                      prototypes_moved=moved)
            protos = new
    floors = select_floors(order, score, share, quotas, stats.counts)
    cols = sorted(set(FINAL_PAYLOAD) | {"pred", "maxprob", "energy", "feature"})
    cand, peak = _select(files, rows, cols, d, protos, z, quotas, floors, batch_rows, timer, "select")
    got = np.bincount(cand.column(CLS).to_numpy(), minlength=c)[:c] if cand.num_rows else np.zeros(c, np.int64)
    info["floors_too_high"] = [int(k) for k in np.flatnonzero(got < quotas)]
    if info["floors_too_high"]:  # a floor cut into the top-quota: exactness first, one more pass
        cand, peak = _select(files, rows, cols, d, protos, z, quotas, np.full(c, -np.inf, np.float32), batch_rows,
                             timer, "select_again")
    info["buffer_peak_rows"] = peak
    info["z"] = info["rounds"][-1]["z"]
    return cand, info


def _select(files, rows, cols, d, protos, z, quotas, floors, batch_rows, timer, name,
            payload=FINAL_PAYLOAD) -> tuple[pa.Table, int]:
    merger = TopKMerger(quotas, slack=0.25)
    kwargs = dict(d=d, protos=protos, z=z, quotas=quotas, floors=floors, payload=payload)
    timer.run(name, rows, run_pass(files, cols, select_block, kwargs, batch_rows), merger.add)
    score_schema = pq.read_schema(files[0])  # for an empty result (blocks with no rows left are not yielded)
    schema = pa.schema([score_schema.field(k) for k in payload] + [pa.field(CLS, pa.int32()), pa.field(RANK, pa.float64())])
    return merger.result(schema, SELECTION_ORDER), merger.peak_rows


def refine_rows(take: np.ndarray, quotas: np.ndarray, counts: np.ndarray, min_rows: int) -> np.ndarray:
    """Per class, the rows the refine pass must find (0: the sample's top share is enough).

    A class needs min(quota, count, min_rows) rows; it goes to the pass when its share of the sample is smaller."""
    want = np.minimum(np.minimum(quotas, counts), min_rows).astype(np.int64)
    return np.where(take < want, want, 0)


REFINE_PAYLOAD = ["key", "pred", "maxprob", "feature"]


def _refine(files, rows, d, protos, z, need, order, score, stats: PoolStats, batch_rows, timer, name) -> pa.Table:
    """The best need_k rows of each class in the pool under this round's scores (exact, as select).

    Floors come from the sample as for select (classes not asking: +inf, so their rows never leave the block);
    a floor that cut into the top need_k reruns the pass without floors."""
    c = len(need)
    share = need * np.bincount(stats.sample_pred, minlength=c)[:c] / np.maximum(stats.counts, 1)
    floors = select_floors(order, score, share, need, stats.counts)
    floors[need == 0] = np.inf
    cols = sorted(set(REFINE_PAYLOAD) | {"energy"})
    got, _ = _select(files, rows, cols, d, protos, z, need, floors, batch_rows, timer, name, REFINE_PAYLOAD)
    have = np.bincount(got.column(CLS).to_numpy(), minlength=c)[:c] if got.num_rows else np.zeros(c, np.int64)
    if np.any(have < need):
        floors = np.where(need > 0, -np.inf, np.inf).astype(np.float32)
        got, _ = _select(files, rows, cols, d, protos, z, need, floors, batch_rows, timer, name + "_again", REFINE_PAYLOAD)
    return got
