"""The pool scan behind the report: the score table streamed file by file, twice (memory ~ one batch plus
the bounded map subsample), for score histograms of selected vs rejected rows and a seeded subsample of
teacher features for the map."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..sample.columns import features_np
from ..sample.keyhash import key_uniform

COLUMNS = ["key", "pred", "maxprob", "entropy", "energy", "feature"]


def _cosine_hist_setup(sel_sum: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(sel_sum, axis=1, keepdims=True)
    return np.where(norm > 0, sel_sum / np.where(norm > 0, norm, 1), 0).astype(np.float32)


def _batches(files: list[str], selected: pa.Array, batch_rows: int) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
    """(batch, selected mask, teacher class) over every score file, in file order."""
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=COLUMNS):
            t = pa.Table.from_batches([b])
            mask = pc.is_in(t.column("key"), value_set=selected).to_numpy(zero_copy_only=False)
            yield t, mask, t.column("pred").to_numpy()


def scan_pool(files: list[str], selected: pa.Array, d: int, c: int, max_points: int, seed: int,
              batch_rows: int = 65_536) -> dict:
    """Two streaming passes: (1) ranges, selected-set prototypes, the map subsample; (2) histograms."""
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    n_sel = len(selected)
    m_sel, m_rej = max_points // 2, max_points - max_points // 2
    p_sel = min(1.0, 1.5 * m_sel / max(n_sel, 1))
    p_rej = min(1.0, 1.5 * m_rej / max(total - n_sel, 1))
    sel_sum = np.zeros((c, d))
    e_lo, e_hi = np.inf, -np.inf
    pts = {"u": [], "f": [], "pred": [], "sel": []}
    for t, mask, pred in _batches(files, selected, batch_rows):
        feat = features_np(t, d)
        en = t.column("energy").to_numpy()
        e_lo, e_hi = min(e_lo, float(en.min())), max(e_hi, float(en.max()))
        if mask.any():
            np.add.at(sel_sum, pred[mask], feat[mask])
        u = key_uniform(t.column("key"), seed)
        take = np.where(mask, u < p_sel, u < p_rej)
        if take.any():
            pts["u"].append(u[take]); pts["f"].append(feat[take]); pts["pred"].append(pred[take]); pts["sel"].append(mask[take])
    protos = _cosine_hist_setup(sel_sum)
    bins = {"maxprob": np.linspace(0, 1, 41), "entropy": np.linspace(0, 1, 41),
            "energy": np.linspace(e_lo, e_hi if e_hi > e_lo else e_lo + 1, 41), "cosine": np.linspace(-1, 1, 41)}
    hist = _histograms(files, selected, batch_rows, d, protos, bins)
    return {"total": total, "bins": bins, "hist": hist, "protos": protos,
            "points": _trim(pts, m_sel, m_rej)}


def _histograms(files: list[str], selected: pa.Array, batch_rows: int, d: int, protos: np.ndarray,
                bins: dict) -> dict:
    """Second pass: per score, counts of selected and rejected rows in each bin."""
    hist = {k: {"sel": np.zeros(40, np.int64), "rej": np.zeros(40, np.int64)} for k in bins}
    for t, mask, pred in _batches(files, selected, batch_rows):
        vals = {k: t.column(k).to_numpy() for k in ("maxprob", "entropy", "energy")}
        vals["cosine"] = (features_np(t, d) * protos[pred]).sum(1)
        for k, v in vals.items():
            hist[k]["sel"] += np.histogram(v[mask], bins[k])[0]
            hist[k]["rej"] += np.histogram(v[~mask], bins[k])[0]
    return hist


def _trim(pts: dict, m_sel: int, m_rej: int) -> dict:
    """The map subsample cut to its budget (m_sel selected, m_rej rejected rows): smallest hash first."""
    sample = {k: np.concatenate(v) if v else np.zeros(0) for k, v in pts.items()}
    keep = []
    for flag, m in ((True, m_sel), (False, m_rej)):
        idx = np.nonzero(sample["sel"] == flag)[0] if len(sample["sel"]) else np.zeros(0, int)
        keep.append(idx[np.argsort(sample["u"][idx], kind="stable")[:m]])
    keep = np.sort(np.concatenate(keep)).astype(int)
    return {k: v[keep] for k, v in sample.items() if k != "u"}
