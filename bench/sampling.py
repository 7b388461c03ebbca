"""Sampling benchmark: `odsd sample` (APS by default) on synthetic score tables of 1M and 10M rows.

Each size runs in a fresh subprocess, so peak RSS is per size: the driver's (ru_maxrss) and the
largest Ray worker's (polled every 0.2 s, bench/rss.py), each also as RssAnon (the process's own heap,
without the pages of Ray's shared-memory object store it has mapped and touched). Synthetic tables:
C = 10 classes, feature_dim = 64 (the CIFAR-10 teacher's), written shard by shard (100k rows per file,
like many score shards: every size reads the same-sized files and both cores get work) and reused when
already there; generation is timed separately.

    python bench/sampling.py                      # 1M and 10M rows, N = 1M, 2 CPUs
    python bench/sampling.py --sizes 200000 --n 20000 --json /tmp/sampling-small.json   # a quick check

Prints a table and writes bench/results/sampling.json.

--pool-check SCORE_DIR is the issue's check on a real scored pool (the 120k Tiny ImageNet pool scored by
the CIFAR-10 teacher): `aps` and `maxprob` at N = 30,000 (seed 0), every class of the APS selection
within +/-20% of N/C, and the sampling report with the provenance table (reports only), which prints
the near-neighbour share of both selections; writes bench/results/sampling_pool.json:

    python bench/sampling.py --pool-check runs/cifar10/score --out runs/cifar10 \\
        --provenance ../shared/data/openworld_provenance.parquet \\
        --reference ../shared/data/cifar10/test --teacher runs/cifar10/teacher.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rss import TreeRSS  # noqa: E402


def _data_dir(base: Path, rows: int, shard_rows: int, seed: int) -> Path:
    return base / f"scores-{rows}-{shard_rows}-s{seed}" / "score"


def generate(base: Path, rows: int, shard_rows: int, seed: int) -> dict:
    """Synthetic score dir (reused if finished); returns {"folder", "seconds", "reused"}.

    Generated in a subprocess: Linux carries a process's peak RSS over fork+exec into the child's
    ru_maxrss, so generating in this process would leak into the measured driver peak."""
    folder = _data_dir(base, rows, shard_rows, seed)
    if (folder / "done.json").is_file():
        return {"folder": str(folder), "seconds": None, "reused": True}
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from bench.synth import make_score_tables; "
            "i = make_score_tables(sys.argv[2], rows=int(sys.argv[3]), num_classes=10, feature_dim=64, "
            "shards=int(sys.argv[4]), seed=int(sys.argv[5]), provenance=False); print(json.dumps(i['seconds']))")
    shards = max(1, -(-rows // shard_rows))
    p = subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder), str(rows), str(shards), str(seed)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"generating {folder} failed:\n{p.stderr[-3000:]}")
    return {"folder": str(folder), "seconds": round(float(p.stdout.strip().splitlines()[-1]), 2), "reused": False}


def child(args) -> None:
    """One measured run in this (fresh) process; prints one JSON line."""
    import ray

    from odsd_dist.config import build_config
    from odsd_dist.sample import run_sample

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    store = args.object_store_mb * 2**20 if args.object_store_mb else None
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=store)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    mon = TreeRSS(os.getpid(), interval=0.2).start()
    with tempfile.TemporaryDirectory(prefix="odsd-bench-sample-") as out:
        cfg = build_config({"out": out, "seed": 0, "ray": {"num_cpus": args.num_cpus},
                            "sample": {"method": args.method, "n": args.n, "scores": args.scores,
                                       "batch_rows": args.batch_rows}})
        s = run_sample(cfg)
    peaks = mon.stop()
    limit = read_limit(args.scores, args.batch_rows)
    ray.shutdown()
    workers = [peaks[r] for r in ("ray_worker", "actor") if r in peaks]
    rows, secs = s["pool_rows"], s["seconds"]
    print("RESULT " + json.dumps({
        "rows": rows, "n": args.n, "method": args.method, "selected": s["selected"], "seconds": secs,
        "rows_per_second": round(rows / secs), "rows_per_second_per_core": round(rows / secs / args.num_cpus),
        "passes": s["passes"], "per_class": s["per_class"], "read_limit": limit,
        "sample_vs_two_read_passes": round(limit["two_passes_seconds"] / secs, 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_peak_anon_mb": round(peaks["driver"]["max_anon_mb"], 1),
        "worker_peak_rss_mb": round(max((w["max_mb"] for w in workers), default=0), 1),
        "worker_peak_anon_mb": round(max((w["max_anon_mb"] for w in workers), default=0), 1),
    }), flush=True)


def _count_rows(batch):
    import pyarrow as pa

    return pa.table({"rows": [batch.num_rows]})


def read_limit(scores: str, batch_rows: int) -> dict:
    """Seconds of Ray Data passes that only read the columns APS reads (the stats pass's, then the select
    pass's) and count rows, through the same run_pass as `odsd sample`: the two-read-pass limit."""
    from odsd_dist.sample.aps import FINAL_PAYLOAD
    from odsd_dist.sample.passes import run_pass
    from odsd_dist.sample.inputs import open_scores

    inp = open_scores(Path(scores))
    out = {}
    for name, cols in (("stats", ["pred", "maxprob", "energy", "feature"]),
                       ("select", sorted(set(FINAL_PAYLOAD) | {"pred", "maxprob", "energy", "feature"}))):
        t0 = time.perf_counter()
        n = sum(t.column("rows").to_numpy().sum() for t in run_pass(inp.files, cols, _count_rows, {}, batch_rows))
        out[f"{name}_read_seconds"] = round(time.perf_counter() - t0, 3)
        assert n == inp.rows, (n, inp.rows)
    out["two_passes_seconds"] = round(out["stats_read_seconds"] + out["select_read_seconds"], 3)
    return out


def pool_check(args) -> int:
    """APS vs maxprob at N on a real score dir, the per-class fill check and the report; exit 1 if a check fails."""
    import ray

    from odsd_dist.config import build_config
    from odsd_dist.report.sampling import build_report
    from odsd_dist.sample import run_sample

    out = Path(args.out)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = {}
    try:
        for method in ("aps", "maxprob"):
            cfg = build_config({"out": str(out), "seed": args.seed, "ray": {"num_cpus": args.num_cpus},
                                "sample": {"method": method, "n": args.pool_n, "scores": args.pool_check,
                                           "out": str(out / f"sample-{method}")}})
            runs[method] = run_sample(cfg)
    finally:
        ray.shutdown()
    aps = runs["aps"]
    names, per_class = aps["class_names"], aps["per_class"]
    target = args.pool_n / len(names)
    lo, hi = 0.8 * target, 1.2 * target
    off = {n: c for n, c in zip(names, per_class) if not lo <= c <= hi}
    print(f"\naps, N = {args.pool_n:,}: per class {dict(zip(names, per_class))}")
    print(f"  every class within +/-20% of N/C = {target:,.0f} ([{lo:,.0f}, {hi:,.0f}]): "
          + ("yes" if not off else f"NO, off: {off} (candidates per class: {dict(zip(names, aps['candidates']))})"))
    report = out / "sample-aps" / "report.html"
    rep = build_report(aps["selection"], str(report), compare=[runs["maxprob"]["selection"]],
                       provenance=args.provenance, reference=args.reference or (), teacher=args.teacher,
                       seed=args.seed)
    prec = rep.get("precision") or {}
    shares = {k.split(" ")[0]: v["overall"] for k, v in prec.items()}
    for k, v in prec.items():
        print(f"  near-neighbour share {k}: {v['overall']:.1%} ({v['hits']:,} of {v['counted']:,} judged; "
              f"{v['unjudged']:,} without a source class)")
    better = shares.get("aps", float("nan")) > shares.get("maxprob", float("nan"))
    if prec:
        print(f"  APS picks a larger near-neighbour share than maxprob: {'yes' if better else 'NO'} "
              f"({100 * (shares['aps'] - shares['maxprob']):+.1f} points)")
    print(f"  report: {report} ({rep['plots']} plots); look at it in a browser")
    doc = {"bench": "sampling_pool", "scores": args.pool_check, "n": args.pool_n, "seed": args.seed,
           "per_class": dict(zip(names, per_class)), "within_20pct": not off, "off": off,
           "candidates": dict(zip(names, aps["candidates"])), "near_neighbour_share": shares,
           "aps_beats_maxprob": bool(better), "precision": prec, "report": str(report),
           "sample_seconds": {m: r["seconds"] for m, r in runs.items()}}
    path = Path(args.json if args.json != DEFAULT_JSON else str(ROOT / "bench" / "results" / "sampling_pool.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0 if (not off and better) else 1


DEFAULT_JSON = str(ROOT / "bench" / "results" / "sampling.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--method", default="aps")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--batch-rows", type=int, default=262_144)
    ap.add_argument("--object-store-mb", type=int, default=None,
                    help="Ray object store size (default: Ray's, 30%% of RAM); bounds the shared pages in RSS")
    ap.add_argument("--shard-rows", type=int, default=100_000, help="rows per synthetic score file (default 100000)")
    ap.add_argument("--data", default="/tmp/odsd-bench/sampling", help="where synthetic tables are kept (reused)")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    g = ap.add_argument_group("the check on a real scored pool (--pool-check)")
    g.add_argument("--pool-check", metavar="SCORE_DIR", help="score dir of the real pool (e.g. runs/cifar10/score)")
    g.add_argument("--pool-n", type=int, default=30_000, help="images to select (default 30000)")
    g.add_argument("--out", default="runs/cifar10", help="sample-aps/ and sample-maxprob/ go here (default runs/cifar10)")
    g.add_argument("--provenance", default=str(ROOT.parent / "shared" / "data" / "openworld_provenance.parquet"))
    g.add_argument("--reference", action="append", default=[], help="labelled original-domain shards for the map")
    g.add_argument("--teacher", help="teacher safetensors (needed with --reference)")
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    if args.pool_check:
        return pool_check(args)
    results = []
    for rows in args.sizes:
        gen = generate(Path(args.data), rows, args.shard_rows, 0)
        cmd = [sys.executable, __file__, "--child", "--scores", gen["folder"], "--n", str(args.n), "--method", args.method,
               "--num-cpus", str(args.num_cpus), "--batch-rows", str(args.batch_rows)]
        cmd += ["--object-store-mb", str(args.object_store_mb)] if args.object_store_mb else []
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[-1][7:])
        r.update(generate_seconds=gen["seconds"], generated_now=not gen["reused"],
                 subprocess_seconds=round(time.perf_counter() - t0, 2))
        results.append(r)
    print(f"\nodsd sample --method {args.method}, N = {args.n:,}, synthetic tables C=10 d=64, Ray num_cpus={args.num_cpus}")
    print(f"{'rows':>12} {'selected':>10} {'seconds':>8} {'rows/s':>11} {'rows/s/core':>12} {'driver RSS':>11} "
          f"{'driver anon':>12} {'worker RSS':>11} {'worker anon':>12} {'gen s':>7}")
    for r in results:
        print(f"{r['rows']:>12,} {r['selected']:>10,} {r['seconds']:>8.1f} {r['rows_per_second']:>11,} "
              f"{r['rows_per_second_per_core']:>12,} {r['driver_peak_rss_mb']:>9.0f}MB {r['driver_peak_anon_mb']:>10.0f}MB "
              f"{r['worker_peak_rss_mb']:>9.0f}MB {r['worker_peak_anon_mb']:>10.0f}MB {r['generate_seconds'] or 0:>7.1f}")
    for r in results:
        lim = r["read_limit"]
        print(f"{r['rows']:>12,} rows: read-only passes over APS's columns: stats {lim['stats_read_seconds']:.1f} s + "
              f"select {lim['select_read_seconds']:.1f} s = {lim['two_passes_seconds']:.1f} s; odsd sample {r['seconds']:.1f} s "
              f"-> {r['sample_vs_two_read_passes']:.2f} of the two-read-pass limit (target >= 0.6)")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        for key, what in (("driver_peak_rss_mb", "driver RSS"), ("driver_peak_anon_mb", "driver RssAnon (own heap)"),
                          ("worker_peak_rss_mb", "largest Ray worker RSS"),
                          ("worker_peak_anon_mb", "largest Ray worker RssAnon")):
            growth = b[key] / a[key] - 1 if a[key] else float("nan")
            print(f"peak RSS growth {a['rows']:,} -> {b['rows']:,} rows, {what}: {growth:+.1%} (target <= +10%)")
    doc = {"bench": "sampling", "method": args.method, "n": args.n, "num_cpus": args.num_cpus, "feature_dim": 64,
           "object_store_mb": args.object_store_mb,
           "num_classes": 10, "batch_rows": args.batch_rows, "shard_rows": args.shard_rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
           "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
