"""Which APS closeness term finds the teacher's domain? An in-memory numpy re-implementation of APS's
per-class top-quota selection, run over a whole score table for a few variants of the prototype term,
judged by near-neighbour precision against a provenance table (the report's class map).

This is an analysis script for small pools (it loads the score table into memory), not the product's
sampler (odsd_dist/sample/aps.py streams). It is how the `aps.center` default was chosen; figures in
docs/RESULTS.md ("Sampling on the 120k pool").

    python bench/aps_variants.py --scores runs/cifar10/score --provenance ../shared/data/openworld_provenance.parquet
"""
from __future__ import annotations

import argparse
import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from odsd_dist.report.classmap import CIFAR10_CLASSES, CIFAR10_TINYIMAGENET


def load(scores: str, provenance: str):
    files = sorted(glob.glob(f"{scores}/scores/*.parquet"))
    t = pa.concat_tables([pq.read_table(f, columns=["key", "pred", "maxprob", "energy", "feature"]) for f in files])
    prov = pq.read_table(provenance, columns=["key", "source_class"])
    src_of = dict(zip(prov.column("key").to_pylist(), prov.column("source_class").to_pylist()))
    src = [src_of.get(k) for k in t.column("key").to_pylist()]
    pred = t.column("pred").to_numpy().astype(np.int64)
    near = [set(CIFAR10_TINYIMAGENET[n]) for n in CIFAR10_CLASSES]
    hit = np.array([s in near[p] for p, s in zip(pred, src)])
    judged = np.array([s is not None and bool(near[p]) for p, s in zip(pred, src)])
    d = t.column("feature").type.list_size
    f = t.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, d).astype(np.float64)
    return dict(pred=pred, mp=t.column("maxprob").to_numpy().astype(np.float64),
                ne=-t.column("energy").to_numpy().astype(np.float64), f=f, hit=hit, judged=judged)


def z(v):
    return (v - v.mean()) / v.std()


def normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def select(pred, score, quota, c):
    sel = np.zeros(len(pred), bool)
    for k in range(c):
        idx = np.nonzero(pred == k)[0]
        sel[idx[np.argsort(-score[idx], kind="stable")][:quota]] = True
    return sel


def aps(p, n, a=(1.0, 1.0, 1.0), rounds=2, center=True):
    pred, mp, f, c = p["pred"], p["mp"], p["f"], 10
    x = f - f.mean(axis=0) if center else f
    mask = np.ones(len(pred), bool)
    for _ in range(rounds):
        proto = np.stack([(mp[mask & (pred == k), None] * x[mask & (pred == k)]).sum(0) for k in range(c)])
        r = (f * normalise(proto)[pred]).sum(1)  # cos(f, mu_pred): the features are unit vectors
        mask = select(pred, a[0] * z(mp) + a[1] * z(r) + a[2] * z(p["ne"]), n // c, c)
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", required=True)
    ap.add_argument("--provenance", required=True)
    ap.add_argument("--n", type=int, default=30_000)
    args = ap.parse_args()
    p = load(args.scores, args.provenance)

    def prec(sel):
        m = sel & p["judged"]
        return 100.0 * p["hit"][m].mean()

    rows = [("maxprob top-N/C", select(p["pred"], p["mp"], args.n // 10, 10))]
    for center in (False, True):
        tag = "centred" if center else "uncentred"
        rows += [(f"prototype cosine only, {tag}, 2 rounds", aps(p, args.n, (0, 1, 0), 2, center)),
                 (f"APS a=(1,1,1), {tag}, 1 round", aps(p, args.n, rounds=1, center=center)),
                 (f"APS a=(1,1,1), {tag}, 2 rounds", aps(p, args.n, rounds=2, center=center)),
                 (f"APS a=(1,1,1), {tag}, 3 rounds", aps(p, args.n, rounds=3, center=center))]
    print(f"near-neighbour precision at N={args.n:,} (pool {len(p['pred']):,}; all-pool {100 * p['hit'][p['judged']].mean():.1f}%)")
    for name, sel in rows:
        print(f"  {name:<42} {prec(sel):5.1f}%")


if __name__ == "__main__":
    main()
