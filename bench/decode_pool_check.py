#!/usr/bin/env python3
"""Decode every entry of the reference pool and check the damage reasons against the provenance table.

    python bench/decode_pool_check.py [--data ../shared/data] [--size 32] [--out runs/bench/decode_pool_check.json]

One process, plain loop (tario + decode_sample). Prints agreement and images/s; writes JSON. The
provenance table is read here only to check the decoder: the pipeline never reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from odsd_dist.shards.decode import Damaged, decode_sample  # noqa: E402
from odsd_dist.shards.tario import expand_shards, iter_samples  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="runs/bench/decode_pool_check.json")
    args = ap.parse_args()
    prov = pq.read_table(os.path.join(args.data, "openworld_provenance.parquet"), columns=["key", "damage"]).to_pydict()
    expected = dict(zip(prov["key"], prov["damage"]))
    got: dict[str, str | None] = {}
    t_read = t_dec = 0.0
    n_img = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for path in expand_shards([os.path.join(args.data, "openworld")]):
        it = iter_samples(path)
        while True:
            a = time.perf_counter()
            sample = next(it, None)
            b = time.perf_counter()
            t_read += b - a
            if sample is None:
                break
            try:
                decode_sample(sample, args.size)
                got[sample["__key__"]] = None
                n_img += 1
            except Damaged as d:
                got[sample["__key__"]] = d.reason
            t_dec += time.perf_counter() - b
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mismatches = [(k, expected.get(k), got.get(k)) for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    result = {
        "entries": len(got),
        "expected_entries": len(expected),
        "intact": n_img,
        "damaged_expected": dict(Counter(v for v in expected.values() if v)),
        "damaged_got": dict(Counter(v for v in got.values() if v)),
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:20],
        "size": args.size,
        "wall_s": round(wall, 2),
        "read_s": round(t_read, 2),
        "decode_s": round(t_dec, 2),
        "cpu_s": round(cpu, 2),
        "entries_per_s": round(len(got) / wall, 1),
        "entries_per_cpu_s": round(len(got) / cpu, 1),  # less sensitive to other load on the machine
        "decode_images_per_s": round(len(got) / t_dec, 1),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if not mismatches and len(got) == len(expected) else 1


if __name__ == "__main__":
    sys.exit(main())
