"""Synthetic score directories for tests and benchmarks, shaped like the scoring stage's output.

Test and benchmark data, not part of the product: `from bench.synth import make_score_tables` with the
repository root on sys.path (tests/conftest.py puts it there).

In-domain rows sit near one of C class prototypes with a confident, low-energy teacher output;
open-world (OOD) rows sit near other centres, with higher energy and a mix of confident and
uncertain outputs. Written shard by shard (memory ~ one shard), with the table metadata, config.yaml
and done.json of a finished score stage, plus an optional provenance table (key, source,
source_class) for reports: source_class is "<class>" for in-domain rows, "ood-<j>" otherwise.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from odsd_dist.stage import StageOutput
from odsd_dist.tables import score_schema, write_table

PROVENANCE_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("source_class", pa.string())])


def _list_array(m: np.ndarray, t: pa.DataType) -> pa.ListArray:
    n, k = m.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1), type=t))


def _fixed_strings(prefix: str, numbers: np.ndarray, width: int, suffix: str = "") -> pa.StringArray:
    """prefix + zero-padded number + suffix for every number, built as one Arrow buffer (no Python loop)."""
    n = len(numbers)
    pre, suf = np.frombuffer(prefix.encode(), np.uint8), np.frombuffer(suffix.encode(), np.uint8)
    length = len(pre) + width + len(suf)
    buf = np.empty((n, length), np.uint8)
    buf[:, : len(pre)] = pre
    x = numbers.astype(np.int64).copy()
    for i in range(width - 1, -1, -1):
        buf[:, len(pre) + i] = 48 + x % 10
        x //= 10
    buf[:, len(pre) + width:] = suf
    offsets = np.arange(0, n * length + 1, length, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(buf.tobytes()))


def _shard_table(rng, start: int, rows: int, shard: str, protos: np.ndarray, ood_centres: np.ndarray,
                 class_p: np.ndarray, in_domain: float, feature_dim: int, topk: int, provenance: bool = True):
    c, d = protos.shape
    ind = rng.random(rows) < in_domain
    y = rng.choice(c, size=rows, p=class_p)
    j = rng.integers(0, len(ood_centres), size=rows)
    centre = np.where(ind[:, None], protos[y], ood_centres[j])
    noise = rng.standard_normal((rows, d), dtype=np.float32)
    spread = np.where(ind, 0.9, 1.3).astype(np.float32)[:, None] / np.sqrt(d, dtype=np.float32)
    f = centre + noise * spread
    f /= np.linalg.norm(f, axis=1, keepdims=True)

    z = rng.standard_normal((rows, c), dtype=np.float32)
    # OOD rows fire some class too: the one whose prototype is closest to their feature.
    fake = np.argmax(np.where(class_p > 0, f @ protos.T, -np.inf), axis=1)  # a 0-weight class stays rare
    peak = np.where(ind, y, fake)
    margin = np.where(ind, rng.uniform(3.0, 9.0, rows), rng.uniform(0.0, 6.0, rows)).astype(np.float32)
    z[np.arange(rows), peak] += margin
    z += np.where(ind, 2.0, -1.0).astype(np.float32)[:, None]  # OOD: lower logits -> higher energy

    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    lse = (zmax + np.log(s))[:, 0]
    pred = np.argmax(z, axis=1).astype(np.int32)
    maxprob = p.max(axis=1).astype(np.float32)
    entropy = (-(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1) / np.log(c)).astype(np.float32)
    k = min(topk, c)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]
    keys = _fixed_strings(shard, np.arange(start, start + rows), 7)
    table = pa.table(
        {
            "key": keys,
            "shard": pa.array(np.full(rows, shard, dtype=object), pa.string()),
            "url": _fixed_strings(f"https://synthetic.example/{shard}", np.arange(start, start + rows), 7, ".jpg"),
            "pred": pa.array(pred),
            "maxprob": pa.array(maxprob),
            "entropy": pa.array(np.clip(entropy, 0, 1)),
            "energy": pa.array((-lse).astype(np.float32)),
            "topk_idx": _list_array(order.astype(np.int32), pa.int32()),
            "topk_logit": _list_array(np.take_along_axis(z, order, axis=1).astype(np.float32), pa.float32()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(f.astype(np.float16).reshape(-1), pa.float16()), feature_dim),
        },
        schema=score_schema(feature_dim),
    )
    if not provenance:
        return table, None
    src = np.where(ind, "synthetic-in", "synthetic-ood").astype(object)
    cls = np.where(ind, np.array([f"class{i}" for i in range(c)], dtype=object)[y],
                   np.array([f"ood-{i}" for i in range(len(ood_centres))], dtype=object)[j])
    prov = pa.table({"key": keys, "source": pa.array(src, pa.string()), "source_class": pa.array(cls, pa.string())},
                    schema=PROVENANCE_SCHEMA)
    return table, prov


def make_score_tables(folder, rows: int, num_classes: int = 10, feature_dim: int = 64, shards: int = 4,
                      seed: int = 0, *, in_domain: float = 0.4, class_weights: Optional[Sequence[float]] = None,
                      topk: int = 10, class_names: Optional[Sequence[str]] = None, provenance: bool = True,
                      ood_centres: int = 20, drop_pred: Sequence[int] = ()) -> dict:
    """Write a finished synthetic score dir at `folder`; returns {"rows", "seconds", "files", ...}.

    class_weights: relative frequency of each class among in-domain rows (a 0 makes a class rare:
    only OOD rows that happen to fire it remain). drop_pred: classes the teacher never predicts
    (their rows are left out). Row i of shard s has key f"{s:05d}{i:07d}".
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    c, d = num_classes, feature_dim
    names = list(class_names) if class_names else [f"class{i}" for i in range(c)]
    rng0 = np.random.default_rng([seed, 7919])
    protos = rng0.standard_normal((c, d)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    ood = rng0.standard_normal((ood_centres, d)).astype(np.float32)
    ood /= np.linalg.norm(ood, axis=1, keepdims=True)
    w = np.ones(c) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    class_p = w / w.sum()
    config = {"synthetic": {"rows": rows, "num_classes": c, "feature_dim": d, "shards": shards, "seed": seed,
                            "in_domain": in_domain, "class_weights": None if class_weights is None else list(map(float, w))}}
    out = StageOutput(folder, "score", config=config, inputs={})
    out.start()
    meta = {"stage": "score", "config": config, "teacher_sha256": f"synthetic-{seed}", "num_classes": c,
            "class_names": names, "feature_dim": d, "projection": None}
    per = [rows // shards + (1 if i < rows % shards else 0) for i in range(shards)]
    files, prov_parts = [], []
    for s, n in enumerate(per):
        shard = f"{s:05d}"
        rng = np.random.default_rng([seed, s])
        table, prov = _shard_table(rng, 0, n, shard, protos, ood, class_p, in_domain, d, topk, provenance)
        if drop_pred:
            keep = pc.invert(pc.is_in(table.column("pred"), value_set=pa.array(list(drop_pred), pa.int32())))
            table, prov = table.filter(keep), (prov.filter(keep) if prov is not None else None)
        path = folder / "scores" / f"{shard}.parquet"
        write_table(table, path, meta)
        files.append(str(path))
        if provenance:
            prov_parts.append(prov)
        del table
    if provenance:
        write_table(pa.concat_tables(prov_parts) if prov_parts else PROVENANCE_SCHEMA.empty_table(),
                    folder / "provenance.parquet", {"stage": "synthetic-provenance"})
    seconds = time.perf_counter() - t0
    out.finish({"rows": rows, "shards": shards, "seconds": round(seconds, 3)})
    return {"rows": rows, "seconds": seconds, "files": files, "folder": str(folder), "class_names": names}


def synthetic_class_map(names: Sequence[str]) -> dict:
    """The near-neighbour map for synthetic tables: class i's in-domain rows are its neighbours."""
    return {n: [f"class{i}"] for i, n in enumerate(names)}
