"""`bench/scoring.py --web`: scoring at web size, side by side in one run (bench/webpool.py makes the pool).

Per pool (the web-size pool and the 32 px pool), on the same teacher and batch:
  decode CPU-s per image, full and reduced (score.reduced_decode), one process over images already in
  memory -> the decode limit on all cores = cores / CPU-s per image
  teacher forward CPU-s per image, run as the scoring actor runs it (frozen, one stream per core)
  combined CPU limit = cores / (decode CPU-s + forward CPU-s per image), with the decode the run uses
  plain loop (webdataset + DataLoader(2 workers) + frozen forward), images/s
  `odsd score`: images/s, and CPU-seconds of every process it starts per image; on a machine shared with
  other work the wall rates fall with the load while CPU-s per image barely move, so the CPU figure
  (limit CPU-s / odsd CPU-s per image: what the rate ratio would be with both cores to itself) is the one
  to read there; quarantine reasons against the pool's damage list (web pool)
And teacher top-1 on the web-size CIFAR-10 test split, full vs reduced decoding.
"""
from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rss import run_measured_cpu

from odsd_dist.score.scorer import TeacherScorer
from odsd_dist.shards.decode import Damaged, decode_image, pick_image
from odsd_dist.shards.tario import iter_samples


def _items(shards: list[str], limit: int) -> list[tuple[str, bytes]]:
    out = []
    for path in shards:
        for s in iter_samples(path):
            p = pick_image(s)
            if p is not None and p[1]:
                out.append((p[0], bytes(p[1])))
            if len(out) >= limit:
                return out
    return out


def decode_cpu(items, size: int, channels: int, reduced: bool) -> dict:
    """CPU-seconds per decoded image, one thread (damaged items are decoded as far as they go, and counted),
    in all and by member extension (`by_format`: images, CPU-s in all, CPU-s per image)."""
    t0, c0 = time.perf_counter(), time.process_time()
    ok = 0
    by: dict[str, list[float]] = {}
    for ext, data in items:
        c1 = time.process_time()
        try:
            decode_image(data, ext, size, channels, reduced=reduced)
            ok += 1
        except Damaged:
            pass
        by.setdefault(ext, []).append(time.process_time() - c1)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    fmt = {e: {"images": len(v), "cpu_s": sum(v), "cpu_s_per_image": sum(v) / len(v)} for e, v in sorted(by.items())}
    return {"images": len(items), "ok": ok, "cpu_s_per_image": cpu / len(items), "wall_s": wall, "reduced": reduced,
            "by_format": fmt}


def reduced_gain_bound(full: dict, reduced: dict) -> float:
    """full / reduced decode CPU if every JPEG decoded for free: what the formats without a reduced mode
    (PNG, WebP) alone allow the full / reduced ratio to reach."""
    rest = sum(v["cpu_s"] for e, v in reduced["by_format"].items() if e not in ("jpg", "jpeg"))
    total = sum(v["cpu_s"] for v in full["by_format"].values())
    return total / rest if rest > 0 else float("inf")


def forward_cpu(scorer: TeacherScorer, arr: np.ndarray, batch: int) -> dict:
    scorer._forward(arr[:batch])  # warm-up
    n = (len(arr) // batch) * batch
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        z, _ = scorer._forward(arr[i:i + batch])
        torch.softmax(z, 1).max(1)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"images": n, "cpu_s_per_image": cpu / n, "images_per_s": n / wall, "streams": scorer.streams}


def _plain_loop(teacher, shards, batch, cores):
    from scoring import plain_loop

    return plain_loop(teacher, shards, batch, 2, cores, "jit")


def odsd_score_cpu(teacher: str, shards: list[str], batch: int, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="odsd-bench-webscore-")
    shard_dir = Path(out) / "in"
    shard_dir.mkdir()
    for s in shards:
        os.symlink(os.path.abspath(s), shard_dir / Path(s).name)
    cmd = [sys.executable, "-m", "odsd_dist.cli", "score", "--set", f"teacher.weights={os.path.abspath(teacher)}",
           "--set", f"score.shards=[{shard_dir}]", "--set", f"out={out}", "--set", f"score.batch_size={batch}",
           "--set", "ray.num_cpus=2", *sum((["--set", e] for e in extra), [])]
    for _ in range(3):  # a loaded machine can miss Ray's fixed 30 s node start-up wait: start again
        rc, wall, rss, text, cpu = run_measured_cpu(cmd)
        if rc == 0 or "timed out during startup" not in text:
            break
        print("odsd score: Ray start-up timed out (machine loaded); retrying", file=sys.stderr)
    if rc != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"odsd score failed with exit code {rc}")
    done = json.loads((Path(out) / "score" / "done.json").read_text())["summary"]
    q = pq.read_table(sorted(glob.glob(str(Path(out) / "score" / "quarantine" / "*.parquet"))) or [], columns=["key", "reason"]) \
        if glob.glob(str(Path(out) / "score" / "quarantine" / "*.parquet")) else None
    reasons = dict(zip(q.column("key").to_pylist(), q.column("reason").to_pylist())) if q is not None else {}
    shutil.rmtree(out, ignore_errors=True)
    n = done["rows"] + done["quarantined"]
    secs = done.get("pipeline_seconds", done["seconds"])
    return {"shards": len(shards), "rows": done["rows"], "quarantined": done["quarantined"], "set": extra,
            "command_seconds": wall, "pipeline_seconds": secs, "images_per_s": n / secs,
            "steady_images_per_s": done.get("steady_images_per_s"),
            "cpu_s": cpu, "cpu_s_per_image": cpu / n, "peak_rss_mb": rss, "_reasons": reasons}


def _top1_job(job):
    path, size, channels, reduced = job
    xs, ys = [], []
    for s in iter_samples(path):
        p = pick_image(s)
        xs.append(decode_image(p[1], p[0], size, channels, reduced=reduced))
        ys.append(int(s["cls"]))
    return np.stack(xs), np.array(ys)


def teacher_top1(teacher: str, shards: list[str], batch: int, cores: int) -> dict:
    scorer = TeacherScorer(teacher, "cpu", "float32", topk=1, feature_dim=1 << 16, seed=0, threads=cores,
                           inference="jit", streams=cores)
    size, channels = int(scorer.meta["input_size"]), int(scorer.meta.get("in_chans", 3))
    res = {}
    for reduced in (False, True):
        with mp.get_context("spawn").Pool(cores) as p:
            parts = p.map(_top1_job, [(s, size, channels, reduced) for s in shards], chunksize=1)
        x, y = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        pred = np.concatenate([scorer._forward(x[i:i + batch])[0].argmax(1).numpy() for i in range(0, len(x), batch)])
        res["reduced" if reduced else "full"] = {"images": len(y), "top1": float((pred == y).mean())}
    res["delta_points"] = 100 * (res["reduced"]["top1"] - res["full"]["top1"])
    return res


def one_pool(name: str, shards: list[str], teacher: str, batch: int, cores: int, decode_images: int,
             extra: list[str], damage: dict | None) -> dict:
    print(f"[{name}] decode CPU per image, full and reduced", file=sys.stderr)
    scorer = TeacherScorer(teacher, "cpu", "float32", topk=1, feature_dim=1 << 16, seed=0, threads=cores,
                           inference="jit", streams=cores)
    size, channels = int(scorer.meta["input_size"]), int(scorer.meta.get("in_chans", 3))
    items = _items(shards, decode_images)
    res = {"shards": len(shards), "decode_full": decode_cpu(items, size, channels, False),
           "decode_reduced": decode_cpu(items, size, channels, True)}
    print(f"[{name}] teacher forward CPU per image", file=sys.stderr)
    arr = []
    for ext, data in items:
        try:
            arr.append(decode_image(data, ext, size, channels))
        except Damaged:
            pass
    while len(arr) < 20 * batch:
        arr = arr + arr
    res["forward"] = forward_cpu(scorer, np.stack(arr[: 20 * batch]), batch)
    fwd = res["forward"]["cpu_s_per_image"]
    for k in ("full", "reduced"):
        d = res[f"decode_{k}"]["cpu_s_per_image"]
        res[f"decode_{k}"]["limit_images_per_s"] = cores / d
        res[f"combined_limit_{k}"] = {"cpu_s_per_image": d + fwd, "images_per_s": cores / (d + fwd)}
    print(f"[{name}] plain loop (webdataset + DataLoader(2) + frozen forward)", file=sys.stderr)
    res["plain_loop"] = _plain_loop(teacher, shards, batch, cores)
    lim = res["combined_limit_reduced"]
    res["ratios"] = {"reduced_vs_full_decode_per_core":
                     res["decode_full"]["cpu_s_per_image"] / res["decode_reduced"]["cpu_s_per_image"],
                     "reduced_vs_full_bound_if_jpeg_free": reduced_gain_bound(res["decode_full"], res["decode_reduced"])}
    # decode tasks between reader and actor (score.decode=tasks), then decoding inside the actor
    for key, sets in (("odsd_score", extra), ("odsd_score_actor", ACTOR_DECODE)):
        print(f"[{name}] odsd score ({len(shards)} shards, {' '.join(sets)})", file=sys.stderr)
        o = odsd_score_cpu(teacher, shards, batch, sets)
        reasons = o.pop("_reasons")
        res[key] = o
        sfx = "" if key == "odsd_score" else "_actor"
        res["ratios"].update({
            f"odsd{sfx}_vs_combined_limit_wall": o["images_per_s"] / lim["images_per_s"],
            f"odsd{sfx}_steady_vs_combined_limit": (o["steady_images_per_s"] or float("nan")) / lim["images_per_s"],
            f"odsd{sfx}_vs_combined_limit_cpu": lim["cpu_s_per_image"] / o["cpu_s_per_image"],
            f"odsd{sfx}_vs_plain_loop_wall": o["images_per_s"] / res["plain_loop"]["images_per_s"]})
        if damage is not None:  # the quarantine against the pool's damage list: same keys, same reasons
            miss = [(k, damage.get(k), reasons.get(k)) for k in sorted(set(reasons) | set(damage))
                    if reasons.get(k) != damage.get(k)]
            res[f"quarantine_check{sfx}"] = {"expected": len(damage), "quarantined": len(reasons),
                                             "same_keys_and_reasons": not miss, "mismatches": miss[:10]}
    return res


# `odsd score` with the actor decoding on its 2 threads; the reader's tasks only read
ACTOR_DECODE = ["score.decode=actor", "score.actor_cpus=1.75", "score.decode_cpus=0.25", "score.threads=2"]


def run_web(args, cores: int) -> dict:
    """Both pools and the top-1 check; prints a table, returns the JSON document."""
    from webpool import _damage_of

    web = sorted(glob.glob(os.path.join(args.web, "pool", "*.tar")))[: args.web_shards or None]
    cifar = sorted(glob.glob(os.path.join(args.web, "cifar10_test", "*.tar")))
    small = sorted(glob.glob(os.path.join(args.pool, "*.tar")))[: args.web_small_shards]
    if not web or not cifar:
        raise SystemExit(f"--web: no pool/ or cifar10_test/ shards in {args.web} (run bench/webpool.py first)")
    extra_web = args.extra if args.extra is not None else ["score.actor_cpus=1.5", "score.decode_cpus=0.25"]
    extra_small = args.extra if args.extra is not None else ["score.actor_cpus=1.5"]
    t0 = time.perf_counter()
    doc = {"cores": cores, "load_avg_at_start": os.getloadavg(), "batch": args.batch}
    keys = set()
    for path in web:
        with tarfile.open(path) as tar:
            keys.update(n.split(".", 1)[0] for n in tar.getnames())
    damage = {k: d for k, d in _damage_of(args.pool).items() if k in keys}
    partial = Path(args.json + ".partial")  # each part as it is measured: a long run on a loaded machine keeps them

    def save():
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(doc, indent=1, default=str))

    print("[top-1] teacher on the web-size CIFAR-10 test split, full and reduced decoding", file=sys.stderr)
    doc["top1_web_cifar10_test"] = teacher_top1(args.teacher, cifar, args.batch, cores)
    save()
    doc["web"] = one_pool("web", web, args.teacher, args.batch, cores, args.web_decode_images, extra_web, damage)
    save()
    doc["small"] = one_pool("32px", small, args.teacher, args.batch, cores, 10_000, extra_small, None)
    save()
    doc["load_avg_at_end"] = os.getloadavg()
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{'images/s (ms CPU per image)':<44}{'web-size':>20}{'32 px':>20}")

    def row(name, f):
        print(f"{name:<44}" + "".join(f"{f(doc[k]):>20}" for k in ("web", "small")))

    ms = lambda x: f"{1e3 * x:.2f} ms"
    row("decode full: limit on all cores", lambda r: f"{r['decode_full']['limit_images_per_s']:,.0f} ({ms(r['decode_full']['cpu_s_per_image'])})")
    row("decode reduced: limit on all cores", lambda r: f"{r['decode_reduced']['limit_images_per_s']:,.0f} ({ms(r['decode_reduced']['cpu_s_per_image'])})")
    row("teacher forward (frozen, streams)", lambda r: f"{r['forward']['images_per_s']:,.0f} ({ms(r['forward']['cpu_s_per_image'])})")
    row("combined CPU limit, reduced decode", lambda r: f"{r['combined_limit_reduced']['images_per_s']:,.0f} ({ms(r['combined_limit_reduced']['cpu_s_per_image'])})")
    row("combined CPU limit, full decode", lambda r: f"{r['combined_limit_full']['images_per_s']:,.0f} ({ms(r['combined_limit_full']['cpu_s_per_image'])})")
    row("plain loop, frozen forward", lambda r: f"{r['plain_loop']['images_per_s']:,.0f}")
    row("odsd score, decode tasks", lambda r: f"{r['odsd_score']['images_per_s']:,.0f} ({ms(r['odsd_score']['cpu_s_per_image'])})")
    row("odsd score, decode tasks, steady", lambda r: f"{r['odsd_score']['steady_images_per_s'] or float('nan'):,.0f}")
    row("odsd score, decode in the actor, steady", lambda r: f"{r['odsd_score_actor']['steady_images_per_s'] or float('nan'):,.0f}")
    row("odsd score, decode in the actor", lambda r: f"{r['odsd_score_actor']['images_per_s']:,.0f} "
                                                     f"({ms(r['odsd_score_actor']['cpu_s_per_image'])})")
    row("reduced / full decode, per core (>= 3)", lambda r: f"{r['ratios']['reduced_vs_full_decode_per_core']:.2f}")
    row("  its bound, were every JPEG free", lambda r: f"{r['ratios']['reduced_vs_full_bound_if_jpeg_free']:.2f}")
    for e in sorted(doc["web"]["decode_full"]["by_format"]):
        row(f"  {e}: ms CPU full / reduced", lambda r: "{:.2f} / {:.2f}".format(
            *(1e3 * r[f"decode_{k}"]["by_format"].get(e, {}).get("cpu_s_per_image", float("nan")) for k in ("full", "reduced"))))
    for sfx, what in (("", "tasks"), ("_actor", "actor")):
        row(f"odsd ({what}) / combined limit, wall (>= 0.8)", lambda r: f"{r['ratios'][f'odsd{sfx}_vs_combined_limit_wall']:.2f}")
        row(f"odsd ({what}) / combined limit, CPU-s", lambda r: f"{r['ratios'][f'odsd{sfx}_vs_combined_limit_cpu']:.2f}")
        row(f"odsd ({what}) steady / combined limit", lambda r: f"{r['ratios'][f'odsd{sfx}_steady_vs_combined_limit']:.2f}")
    t = doc["top1_web_cifar10_test"]
    print(f"\nteacher top-1, web-size CIFAR-10 test ({t['full']['images']:,}): full {100 * t['full']['top1']:.2f} %, "
          f"reduced {100 * t['reduced']['top1']:.2f} % ({t['delta_points']:+.2f} points)")
    for sfx in ("", "_actor"):
        q = doc["web"].get(f"quarantine_check{sfx}", {})
        print(f"web pool quarantine{sfx.replace('_', ', ')}: {q.get('quarantined')} of {q.get('expected')} damaged, "
              f"same keys and reasons: {q.get('same_keys_and_reasons')} {q.get('mismatches') or ''}")
    print(f"load average at start {doc['load_avg_at_start']}, at end {doc['load_avg_at_end']}; {doc['seconds']} s")
    return doc
