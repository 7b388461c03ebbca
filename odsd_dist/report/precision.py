"""Near-neighbour precision of a selection, judged with a provenance table and a class map (classmap.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def near_neighbour_precision(sel: pa.Table, prov: pa.Table, names, class_map: dict) -> dict:
    """Share of selected rows whose provenance source_class is in class_map[teacher class].

    Only rows the provenance can judge count: a selected key missing from the provenance or with no
    source_class (e.g. Tiny ImageNet's unlabelled test split) is reported as unjudged, and classes
    with an empty neighbour list are left out of the overall figure."""
    j = sel.select(["key", "pred"]).join(prov.select(["key", "source", "source_class"]), "key")
    pred = j.column("pred").to_numpy().astype(np.int64)
    src = np.array(j.column("source_class").to_pylist(), dtype=object)
    known = np.array([s is not None for s in src], dtype=bool)
    neighbours = [set(class_map.get(n, ())) for n in names]
    hit = np.array([s in neighbours[p] for p, s in zip(pred, src)], dtype=bool)
    per_class, tot_hit, tot = {}, 0, 0
    for k, name in enumerate(names):
        if not neighbours[k]:
            continue
        m = (pred == k) & known
        if m.any():
            per_class[name] = float(hit[m].mean())
            tot_hit += int(hit[m].sum()); tot += int(m.sum())
    by_source = {}
    for s, cnt in zip(*np.unique(np.array(j.column("source").to_pylist(), dtype=object).astype(str), return_counts=True)):
        by_source[s] = int(cnt)
    top = {}
    for k, name in enumerate(names):
        m = (pred == k) & known
        if m.any():
            u, cnt = np.unique(src[m].astype(str), return_counts=True)
            o = np.argsort(-cnt, kind="stable")[:5]
            top[name] = [(str(u[i]), int(cnt[i])) for i in o]
    return {"per_class": per_class, "overall": tot_hit / tot if tot else float("nan"), "matched": j.num_rows,
            "unjudged": int(sel.num_rows - known.sum()), "by_source": by_source, "top_sources": top,
            "hits": tot_hit, "counted": tot}
