#!/usr/bin/env python
"""Scoring benchmark: `odsd score` against a plain loop and the machine's limits, in one run.

    python bench/scoring.py --pool ../shared/data/openworld --teacher runs/cifar10/teacher.safetensors
    python bench/scoring.py --pool ../shared/data/openworld --teacher ... --web runs/webpool   # bench/webscore.py

Measures, on the same tars, teacher and batch size:
  1. decode-only images/s (the project's decoder, one process per core)   -- a machine limit
  2. teacher-forward-only images/s on pre-decoded tensors (all cores), run as the scoring actor runs it:
     the eager module and the frozen forward (score.inference=jit, models/inference.py) on all cores'
     OpenMP threads, and the frozen forward as one single-threaded stream per core (score.streams, the
     actor's default on CPU) -- the machine's forward limit is the best of these
  3. a plain single-process loop: webdataset + torch DataLoader (2 workers) + teacher, as a user would
     write it (the eager module), and the same loop given the frozen forward
  4. `odsd score` on all shards (fresh output), and on 2 shards, with the peak RSS of the driver
     and of every Ray process, to show memory does not grow with the number of shards.
Prints a table and writes JSON (default bench/results/scoring.json).
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import run_measured  # noqa: E402

from odsd_dist.models import inference_forward, load_model, normalize  # noqa: E402
from odsd_dist.shards.decode import Damaged, decode_image, pick_image  # noqa: E402
from odsd_dist.shards.tario import iter_samples  # noqa: E402


def _decode_shard(args) -> tuple[int, int]:
    path, size, channels = args
    ok = bad = 0
    for s in iter_samples(path):
        picked = pick_image(s)
        try:
            if picked is None:
                raise Damaged("no_image", "")
            decode_image(picked[1], picked[0], size, channels)
            ok += 1
        except Damaged:
            bad += 1
    return ok, bad


def decode_only(shards: list[str], size: int, channels: int, procs: int) -> dict:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        res = pool.map(_decode_shard, [(s, size, channels) for s in shards], chunksize=1)
    dt = time.perf_counter() - t0
    ok = sum(r[0] for r in res)
    return {"images": ok, "damaged": sum(r[1] for r in res), "seconds": dt, "images_per_s": ok / dt, "processes": procs}


def _forward(teacher: str, batch: int, mode: str):
    """(forward x -> (logits, features), meta): the eager module or the frozen one (models/inference.py)."""
    model, meta = load_model(teacher)
    size, channels = int(meta["input_size"]), int(meta.get("in_chans", 3))
    example = normalize(torch.zeros((batch, size, size, channels), dtype=torch.uint8), meta)
    fwd, used = inference_forward(model.eval(), example, mode)
    if used != mode:
        raise SystemExit(f"teacher forward: asked for {mode}, got {used}")
    return fwd, meta


def forward_only(teacher: str, shards: list[str], batch: int, threads: int, images: int, mode: str, streams: int = 1) -> dict:
    """Teacher forward on pre-decoded uint8 images, run exactly as the scoring actor runs it
    (`TeacherScorer._forward`: normalise, pad, forward; `streams` single-threaded forwards side by side,
    or one forward on `threads` OpenMP threads when streams=1)."""
    from odsd_dist.score.scorer import TeacherScorer

    scorer = TeacherScorer(teacher, "cpu", "float32", topk=1, feature_dim=1 << 16, seed=0, threads=threads,
                           inference=mode, streams=streams)
    if scorer.inference != mode:
        raise SystemExit(f"teacher forward: asked for {mode}, got {scorer.inference}")
    size, channels = int(scorer.meta["input_size"]), int(scorer.meta.get("in_chans", 3))
    xs = []
    for path in shards:
        for s in iter_samples(path):
            picked = pick_image(s)
            if picked is None:
                continue
            try:
                xs.append(decode_image(picked[1], picked[0], size, channels))
            except Damaged:
                continue
            if len(xs) >= images:
                break
        if len(xs) >= images:
            break
    arr = np.stack(xs)
    scorer._forward(arr[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(arr) - batch + 1, batch):
        z, _ = scorer._forward(arr[i:i + batch])
        torch.softmax(z, 1).max(1)
    dt = time.perf_counter() - t0
    n = (len(arr) // batch) * batch
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "threads": threads, "streams": scorer.streams,
            "inference": mode}


class _WdsDecode:
    def __init__(self, size, channels):
        self.size, self.channels = size, channels

    def __call__(self, sample):
        picked = pick_image(sample)
        if picked is None:
            return None
        try:
            return torch.from_numpy(decode_image(picked[1], picked[0], self.size, self.channels))
        except Damaged:
            return None


def _stack(images: list) -> torch.Tensor:
    return torch.stack(images)


def plain_loop(teacher: str, shards: list[str], batch: int, workers: int, threads: int, mode: str) -> dict:
    """webdataset + torch DataLoader(workers) + teacher in one process: what a user would write (mode eager)."""
    import webdataset as wds

    torch.set_num_threads(threads)
    fwd, meta = _forward(teacher, batch, mode)
    size, channels = int(meta["input_size"]), int(meta.get("in_chans", 3))
    ds = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, empty_check=False, handler=wds.warn_and_continue)
          .map(_WdsDecode(size, channels)).select(lambda x: x is not None).batched(batch, collation_fn=_stack, partial=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in loader:
            z, _ = fwd(normalize(x, meta))
            torch.softmax(z, 1).max(1)
            n += len(x)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "workers": workers, "threads": threads, "inference": mode}


def odsd_score(teacher: str, shards: list[str], batch: int, actors: int, extra: list[str], keep: str = "") -> dict:
    out = tempfile.mkdtemp(prefix="odsd-bench-score-")
    shard_dir = Path(out) / "in"
    shard_dir.mkdir()
    for s in shards:  # link the chosen shards into one folder so the config lists them
        os.symlink(os.path.abspath(s), shard_dir / Path(s).name)
    cmd = [sys.executable, "-m", "odsd_dist.cli", "score", "--set", f"teacher.weights={os.path.abspath(teacher)}",
           "--set", f"score.shards=[{shard_dir}]", "--set", f"out={out}", "--set", f"score.batch_size={batch}",
           "--set", f"score.actors={actors}", "--set", "ray.num_cpus=2", *extra]
    rc, wall, rss, text = run_measured(cmd)
    if rc != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"odsd score failed with exit code {rc}")
    done = json.loads((Path(out) / "score" / "done.json").read_text())["summary"]
    if keep:  # keep the score table for the sampling checks (same teacher, same pool)
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(str(Path(out) / "score"), keep)
    shutil.rmtree(out, ignore_errors=True)
    return {"shards": len(shards), "rows": done["rows"], "quarantined": done["quarantined"],
            "command_seconds": wall, "stage_seconds": done["seconds"],
            "pipeline_seconds": done.get("pipeline_seconds", done["seconds"]),
            "images_per_s": (done["rows"] + done["quarantined"]) / done.get("pipeline_seconds", done["seconds"]),
            "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", required=True, help="folder of pool .tar shards")
    ap.add_argument("--teacher", required=True, help="teacher safetensors")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--forward-images", type=int, default=20000)
    ap.add_argument("--json", default="bench/results/scoring.json")
    ap.add_argument("--keep", default="", help="move the full run's score folder here (e.g. runs/cifar10/score)")
    ap.add_argument("--set", dest="extra", action="append", default=None,
                    help="extra --set for odsd score (default: score.actor_cpus=1.5, i.e. a 2-thread teacher "
                         "actor beside 0.5 CPU of decoding on the 2 CPUs the bench gives Ray)")
    ap.add_argument("--web", default="", help="web mode: the folder bench/webpool.py wrote (pool/, cifar10_test/); "
                    "measures it beside the first --web-small-shards shards of --pool (bench/webscore.py)")
    ap.add_argument("--web-shards", type=int, default=0, help="web mode: only the first n web-size shards (0: all)")
    ap.add_argument("--web-small-shards", type=int, default=8)
    ap.add_argument("--web-decode-images", type=int, default=2000)
    args = ap.parse_args()
    if args.web:
        from webscore import run_web

        doc = run_web(args, os.cpu_count() or 1)
        path = Path(args.json if args.json != "bench/results/scoring.json" else "bench/results/scoring_web.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {path}")
        return
    shards = sorted(glob.glob(os.path.join(args.pool, "*.tar")))
    if not shards:
        raise SystemExit(f"--pool: no .tar files in {args.pool}")
    cores = os.cpu_count() or 1
    _, meta = load_model(args.teacher)
    size, channels = int(meta["input_size"]), int(meta.get("in_chans", 3))
    args.extra = ["score.actor_cpus=1.5"] if args.extra is None else args.extra
    extra = sum((["--set", e] for e in args.extra), [])
    res = {"machine": {"cores": cores, "python": platform.python_version(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine()},
           "pool": args.pool, "shards": len(shards), "batch": args.batch, "teacher_arch": meta["arch"],
           "odsd_score_set": args.extra}
    print(f"[1/8] decode only ({cores} processes)", file=sys.stderr)
    res["decode_only"] = decode_only(shards, size, channels, cores)
    print("[2/8] teacher forward only, eager module", file=sys.stderr)
    res["forward_only_eager"] = forward_only(args.teacher, shards, args.batch, cores, args.forward_images, "eager")
    print("[3/8] teacher forward only, frozen (score.inference=jit), one forward on all threads", file=sys.stderr)
    res["forward_only"] = forward_only(args.teacher, shards, args.batch, cores, args.forward_images, "jit")
    print("[4/8] teacher forward only, frozen, one single-threaded stream per core", file=sys.stderr)
    res["forward_only_streams"] = forward_only(args.teacher, shards, args.batch, cores, args.forward_images, "jit", cores)
    print("[5/8] plain loop (webdataset + DataLoader, 2 workers), eager module", file=sys.stderr)
    res["plain_loop"] = plain_loop(args.teacher, shards, args.batch, 2, cores, "eager")
    print("[6/8] plain loop, frozen forward", file=sys.stderr)
    res["plain_loop_jit"] = plain_loop(args.teacher, shards, args.batch, 2, cores, "jit")
    print("[7/8] odsd score, 2 shards", file=sys.stderr)
    res["odsd_score_2"] = odsd_score(args.teacher, shards[:2], args.batch, args.actors, extra)
    print(f"[8/8] odsd score, {len(shards)} shards", file=sys.stderr)
    res["odsd_score_all"] = odsd_score(args.teacher, shards, args.batch, args.actors, extra, args.keep)
    # the lower limit: the slower of decoding and the machine's best teacher forward (the frozen one, either
    # way of threading it, unless score.inference=eager is passed with --set)
    mode = "eager" if "score.inference=eager" in args.extra else "jit"
    fwd_limit = (res["forward_only_eager"] if mode == "eager" else
                 max(res["forward_only"], res["forward_only_streams"], key=lambda r: r["images_per_s"]))
    res["forward_limit"] = fwd_limit
    lower = min(res["decode_only"]["images_per_s"], fwd_limit["images_per_s"])
    pipe = res["odsd_score_all"]["images_per_s"]
    res["ratios"] = {"pipeline_vs_lower_limit": pipe / lower, "pipeline_vs_plain_loop": pipe / res["plain_loop"]["images_per_s"],
                     "pipeline_vs_plain_loop_jit": pipe / res["plain_loop_jit"]["images_per_s"]}
    r2, r32 = res["odsd_score_2"]["peak_rss_mb"], res["odsd_score_all"]["peak_rss_mb"]
    res["rss_growth"] = {role: r32[role]["max_mb"] / r2[role]["max_mb"] for role in r2 if role in r32}
    res["anon_growth"] = {role: r32[role]["max_anon_mb"] / max(r2[role]["max_anon_mb"], 1e-9) for role in r2 if role in r32}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    rows = [("decode only (limit)", res["decode_only"]["images_per_s"]),
            ("teacher forward only, eager", res["forward_only_eager"]["images_per_s"]),
            ("teacher forward only, frozen", res["forward_only"]["images_per_s"]),
            ("  ... frozen, 1 stream per core", res["forward_only_streams"]["images_per_s"]),
            ("plain loop: wds + DataLoader(2)", res["plain_loop"]["images_per_s"]),
            ("plain loop, frozen forward", res["plain_loop_jit"]["images_per_s"]),
            ("odsd score, 2 shards", res["odsd_score_2"]["images_per_s"]),
            (f"odsd score, {len(shards)} shards", pipe)]
    print(f"\n{'what':<36}{'images/s':>12}")
    for name, v in rows:
        print(f"{name:<36}{v:>12,.0f}")
    print(f"\npipeline / lower limit = {res['ratios']['pipeline_vs_lower_limit']:.2f} (target >= 0.8)")
    print(f"pipeline / plain loop  = {res['ratios']['pipeline_vs_plain_loop']:.2f} (target >= 1.0)")
    print(f"pipeline / plain loop with the frozen forward = {res['ratios']['pipeline_vs_plain_loop_jit']:.2f}")
    for key, title in (("max_mb", "peak RSS (MB)"), ("max_anon_mb", "peak RssAnon (MB)")):
        print(f"\n{title:<20}{'2 shards':>10}{f'{len(shards)} shards':>12}{'ratio':>8}")
        for role in sorted(set(r2) | set(r32)):
            a = r2.get(role, {}).get(key, float("nan"))
            b = r32.get(role, {}).get(key, float("nan"))
            print(f"{role:<20}{a:>10.0f}{b:>12.0f}{b / max(a, 1e-9):>8.2f}")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
