"""Training benchmarks for `odsd distill` (docs/BENCHMARKS.md, "Training").

1. memory: a ResNet-50 student at 224 px (1000 classes, KD from a frozen ResNet-18 teacher, AdamW) trains
   a few steps on 2 Ray Train workers under ZeRO-0 and ZeRO-3; each rank reports its parameter and
   optimizer-state bytes (distill/engine.rank_state_bytes). Target: ZeRO-3 <= 0.55x ZeRO-0 at 2 ranks.
2. throughput: samples/s of `odsd distill` (2 workers, ZeRO-2, CIFAR-size student, the real data
   pipeline) against a plain single-process torch loop on the same model, global batch, method,
   augmentation and training data (the Parquet `odsd distill` materialised). Target >= 0.85x.
3. cache: the KD step with the teacher's outputs cached (distill.teacher_outputs=cached) against the same
   step with the teacher run online, in `odsd distill` and in the plain loop, side by side in one run.
   Target: cached >= 1.8x online in `odsd distill`.

usage: python bench/train.py [--part memory|throughput|cache|all] [--pool ../shared/data/openworld/00000.tar]
       [--out bench/results/train.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- 1. ZeRO memory -----------------------------------------------------------------------------------

def _memory_loop(config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch

    from odsd_dist.distill.config import DistillConfig
    from odsd_dist.distill.engine import DistillModule, build_engine, rank_state_bytes
    from odsd_dist.distill.methods import Dims, build_method
    from odsd_dist.models import build_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = ray.train.get_context().get_world_rank()
    size, b = config["size"], config["batch"]
    torch.manual_seed(0)
    teacher = build_model("resnet18", 1000, 3).eval().requires_grad_(False)
    rows = []
    for dtype in config["dtypes"]:
        tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
        teacher.to(tdt)
        for stage in config["stages"]:
            dcfg = DistillConfig(student="resnet50", method="kd", zero_stage=stage, dtype=dtype, batch_size=b,
                                 optimizer="adamw", lr=1e-4)
            torch.manual_seed(0)
            student = build_model("resnet50", 1000, 3)
            method = build_method("kd", dcfg.options, Dims(student.feature_dim, teacher.feature_dim, 1000))
            engine = build_engine(DistillModule(student, method, teacher), dcfg, 2, config["steps"])
            g = torch.Generator().manual_seed(rank)
            times, losses = [], []
            for _ in range(config["steps"]):
                batch = {"weak": torch.randn(b, 3, size, size, generator=g).to(tdt), "weight": torch.ones(b)}
                t0 = time.perf_counter()
                terms = engine(method.loss, batch, engine.module.student, teacher)
                engine.backward(terms["total"])
                engine.step()
                times.append(time.perf_counter() - t0)
                losses.append(float(terms["total"]))
            rows.append({"rank": rank, "dtype": dtype, "zero_stage": stage, **rank_state_bytes(engine),
                         "step_seconds": times, "losses": losses,
                         "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                         for p in engine.module.student.parameters())})
            del engine
    Path(config["out"], f"memory_rank{rank}.json").write_text(json.dumps(rows))


def bench_memory(args, scratch: Path) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    scratch.mkdir(parents=True, exist_ok=True)
    cfg = {"size": 224, "batch": args.mem_batch, "steps": args.mem_steps, "stages": [0, 3],
           "dtypes": args.dtypes, "out": str(scratch)}
    t0 = time.perf_counter()
    TorchTrainer(_memory_loop, train_loop_config=cfg,
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="bench-memory", storage_path=str(scratch / "ray_results"))).fit()
    rows = [r for k in (0, 1) for r in json.loads((scratch / f"memory_rank{k}.json").read_text())]
    out = {"config": cfg, "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "ratios": {}}
    print(f"\nZeRO memory: ResNet-50 student, 224 px, 1000 classes, AdamW, 2 ranks, batch {cfg['batch']}/rank")
    print(f"{'dtype':6s} {'ZeRO':>4s} {'rank':>4s} {'params MiB':>10s} {'optim MiB':>10s} {'total MiB':>10s} "
          f"{'vs ZeRO-0':>9s} {'s/step':>7s}")
    for dtype in cfg["dtypes"]:
        for rank in (0, 1):
            base = next(r for r in rows if r["dtype"] == dtype and r["rank"] == rank and r["zero_stage"] == 0)
            b0 = base["param_bytes"] + base["optimizer_bytes"]
            for r in rows:
                if r["dtype"] != dtype or r["rank"] != rank:
                    continue
                tot = r["param_bytes"] + r["optimizer_bytes"]
                ratio = tot / b0
                out["ratios"][f"{dtype}_zero{r['zero_stage']}_rank{rank}"] = round(ratio, 4)
                print(f"{dtype:6s} {r['zero_stage']:4d} {rank:4d} {r['param_bytes'] / 2**20:10.1f} "
                      f"{r['optimizer_bytes'] / 2**20:10.1f} {tot / 2**20:10.1f} {ratio:9.3f} "
                      f"{np.median(r['step_seconds']):7.2f}")
    return out


# --- 2. throughput ------------------------------------------------------------------------------------

def _make_inputs(args, scratch: Path, teacher_arch: str = "resnet20") -> dict:
    """A teacher (`teacher_arch`, randomly initialised: throughput does not depend on its weights) and a
    selection of every intact image of one real pool shard with 3-class low-noise targets."""
    import pyarrow as pa

    from odsd_dist.models import build_model, save_model
    from odsd_dist.shards.decode import Damaged, decode_sample
    from odsd_dist.shards.tario import iter_samples, shard_name
    from odsd_dist.tables import SELECTION_SCHEMA, write_table

    scratch.mkdir(parents=True, exist_ok=True)
    teacher = scratch / ("teacher.safetensors" if teacher_arch == "resnet20" else f"teacher-{teacher_arch}.safetensors")
    if not teacher.exists():
        import torch

        torch.manual_seed(0)
        names = [f"class{i}" for i in range(10)]
        save_model(build_model(teacher_arch, 10, 3), teacher,
                   {"arch": teacher_arch, "num_classes": 10, "in_chans": 3, "input_size": 32,
                    "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261], "class_names": names})
    sel = scratch / "selection.parquet"
    if not sel.exists():
        keys = []
        for s in iter_samples(args.pool):
            try:
                decode_sample(s, 32)
            except Damaged:
                continue
            keys.append(s["__key__"])
        rng = np.random.default_rng(0)
        n = len(keys)
        idx = [rng.choice(10, 3, replace=False).tolist() for _ in keys]
        t = pa.table({"key": keys, "shard": [shard_name(args.pool)] * n, "url": [""] * n,
                      "pred": pa.array([i[0] for i in idx], pa.int32()), "score": pa.array(np.ones(n), pa.float32()),
                      "weight": pa.array(np.ones(n), pa.float32()), "target_idx": pa.array(idx, pa.list_(pa.int32())),
                      "target_prob": pa.array([[0.6, 0.3, 0.1]] * n, pa.list_(pa.float32()))}, schema=SELECTION_SCHEMA)
        write_table(t, sel, {"stage": "sample", "config": {"targets": {"tau": 4.0}}})
    return {"teacher": str(teacher), "selection": str(sel)}


def _distill_config(args, scratch: Path, inp: dict, **over):
    from odsd_dist.config import build_config

    return build_config({
        "seed": 0, "out": str(scratch / "run"), "ray": {"num_cpus": 2},
        "teacher": {"weights": inp["teacher"]}, "score": {"shards": [args.pool]},
        "distill": {"student": args.student, "method": args.method, "selection": inp["selection"],
                    "workers": 2, "worker_cpus": 0.5, "data_cpus": 0.25, "threads": 1, "zero_stage": 2,
                    "dtype": "fp32", "batch_size": args.batch, "steps": args.steps, "checkpoint_every": 10_000,
                    "eval_every_epoch": False, "log_every": 5, "optimizer": "sgd", "lr": 0.05,
                    "cache": {"views": 4}, **over}})


def plain_loop(cfg, train_dir: Path, steps: int, global_batch: int, threads: int) -> dict:
    """The same step (model, method, augmentation, optimizer) in one process, no Ray, no DeepSpeed (with the
    stored teacher outputs when `train_dir` is a teacher cache)."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers the tensor column type of train_data/)
    import torch

    from odsd_dist.distill.augment import augment_batch
    from odsd_dist.distill.engine import DistillModule, lr_factor, make_optimizer
    from odsd_dist.distill.methods import Dims, build_method
    from odsd_dist.models import build_model, load_model

    torch.set_num_threads(threads)
    d = cfg.distill
    table = pq.read_table(train_dir)
    images = table.column("image").combine_chunks().to_numpy()
    cols = {k: table.column(k).to_numpy() for k in ("idx", "weight", "label")}
    tgt_i = table.column("tgt_idx").combine_chunks().to_numpy()
    tgt_p = table.column("tgt_prob").combine_chunks().to_numpy()
    cached = {c: table.column(c).combine_chunks().to_numpy() for c in table.column_names if c.startswith("tc_")}
    teacher, tmeta = load_model(cfg.teacher.weights)
    teacher.requires_grad_(False)
    torch.manual_seed(0)
    student = build_model(d.student, 10, 3)
    method = build_method(d.method, d.options, Dims(student.feature_dim, teacher.feature_dim, 10))
    module = DistillModule(student, method, teacher)
    opt = make_optimizer(module.parameters(), d)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, d.warmup_steps))
    rng = np.random.default_rng(0)
    n = len(images)
    times = []
    warm = 3
    t_start = None
    for step in range(steps + warm):
        if step == warm:
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        pick = rng.choice(n, global_batch, replace=False)
        raw = {"image": images[pick], "idx": cols["idx"][pick], "weight": cols["weight"][pick],
               "label": cols["label"][pick], "tgt_idx": tgt_i[pick], "tgt_prob": tgt_p[pick],
               **{c: v[pick] for c, v in cached.items()}}
        b = augment_batch(raw, views=type(method).views(getattr(d.options, d.method)), aug=d.augment, mean=tmeta["mean"], std=tmeta["std"],
                          seed=(0, 0, step))
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
        terms = method.loss(batch, student, teacher)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        sched.step()
        if step >= warm:
            times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    return {"steps": steps, "global_batch": global_batch, "threads": threads,
            "samples_per_s": global_batch * steps / wall, "median_step_s": float(np.median(times))}


def _distill_sps(cfg, log_every: int) -> tuple[float, dict]:
    """(steady samples/s, summary) of a fresh `odsd distill` run (training data and cache kept)."""
    import shutil

    from odsd_dist.distill import run_distill

    shutil.rmtree(cfg.stage_dir("distill") / "ray_results", ignore_errors=True)
    (cfg.stage_dir("distill") / "done.json").unlink(missing_ok=True)
    summary = run_distill(cfg)
    hist = json.loads((cfg.stage_dir("distill") / "history.json").read_text())["history"]
    spe = summary["steps_per_epoch"]
    steady = [h["samples_per_s"] for i, h in enumerate(hist) if i > 0 and (h["step"] - 1) % spe >= log_every]
    return (float(np.median(steady)) if steady else summary["samples_per_s"]), summary


def bench_cache(args, scratch: Path) -> dict:
    """KD with the teacher online vs cached, for each of `--teachers`, in `odsd distill` with each data
    feed and in the plain loop (one run, side by side)."""
    out = {}
    for arch in args.teachers:
        out[arch] = _bench_cache_one(args, scratch / arch if arch != "resnet20" else scratch, arch)
    return out


def _bench_cache_one(args, scratch: Path, arch: str) -> dict:
    import ray

    inp = _make_inputs(args, scratch, arch)
    out: dict = {"online": {}, "cached": {}}
    for mode in ("online", "cached"):
        for feed in args.feeds:
            cfg = _distill_config(args, scratch / mode, inp, method="kd", teacher_outputs=mode, feed=feed)
            sps, summary = _distill_sps(cfg, args.log_every)
            out[mode][feed] = {"distill_steady_samples_per_s": sps, "summary": summary}
    ray.shutdown()
    for mode in ("online", "cached"):
        folder = _distill_config(args, scratch / mode, inp).stage_dir("distill")
        data = folder / ("teacher_cache" if mode == "cached" else "train_data")
        cfg = _distill_config(args, scratch / mode, inp, method="kd")
        out[mode]["plain"] = plain_loop(cfg, data, args.plain_steps, 2 * args.batch, args.threads)
    sps = {(m, f): out[m][f]["distill_steady_samples_per_s"] for m in ("online", "cached") for f in args.feeds}
    out["ratio_distill"] = {f: sps["cached", f] / sps["online", f] for f in args.feeds}
    out["ratio_plain"] = out["cached"]["plain"]["samples_per_s"] / out["online"]["plain"]["samples_per_s"]
    print(f"\nTeacher outputs: {args.student} KD from a {arch} teacher, global batch {2 * args.batch}, fp32, CPU")
    for mode in ("online", "cached"):
        feeds = ", ".join(f"feed {f} {sps[mode, f]:.1f}" for f in args.feeds)
        print(f"  {mode:7s} odsd distill (2 workers, ZeRO-2): {feeds} samples/s; "
              f"plain loop {out[mode]['plain']['samples_per_s']:.1f} samples/s")
    ratios = ", ".join(f"feed {f} {r:.2f}x" for f, r in out["ratio_distill"].items())
    print(f"  cached / online: odsd distill {ratios} (target 1.8); plain loop {out['ratio_plain']:.2f}x")
    return out


def bench_throughput(args, scratch: Path) -> dict:
    import shutil

    from odsd_dist.distill import run_distill

    inp = _make_inputs(args, scratch)
    cfg = _distill_config(args, scratch, inp)
    shutil.rmtree(cfg.stage_dir("distill") / "ray_results", ignore_errors=True)
    (cfg.stage_dir("distill") / "done.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    summary = run_distill(cfg)
    wall = time.perf_counter() - t0
    hist = json.loads((cfg.stage_dir("distill") / "history.json").read_text())["history"]
    # steady state: every logged interval except the first of each epoch/pass (dataset start-up)
    spe = summary["steps_per_epoch"]
    steady = [h["samples_per_s"] for i, h in enumerate(hist) if i > 0 and (h["step"] - 1) % spe >= args.log_every]
    span = hist[-1]["time"] - hist[0]["time"]
    e2e = (hist[-1]["step"] - hist[0]["step"]) * args.batch * 2 / span if span > 0 else None
    import ray

    ray.shutdown()
    plain = plain_loop(cfg, cfg.stage_dir("distill") / "train_data", args.plain_steps, 2 * args.batch, args.threads)
    dist_sps = float(np.median(steady)) if steady else summary["samples_per_s"]
    out = {"distill": {"summary": summary, "steady_samples_per_s": dist_sps, "first_to_last_step_samples_per_s": e2e,
                       "wall_seconds_incl_startup": round(wall, 1)},
           "plain": plain, "ratio_steady": dist_sps / plain["samples_per_s"],
           "ratio_first_to_last": (e2e / plain["samples_per_s"]) if e2e else None}
    print(f"\nThroughput: {args.student} {args.method}, 32 px, global batch {2 * args.batch}, fp32, CPU")
    print(f"  odsd distill (2 workers x {args.batch}, ZeRO-2): steady {dist_sps:.1f} samples/s, "
          f"first-to-last step {e2e:.1f} samples/s (epoch boundaries included)")
    print(f"  plain torch loop (1 process, {args.threads} threads): {plain['samples_per_s']:.1f} samples/s")
    print(f"  ratio: steady {out['ratio_steady']:.3f}x, first-to-last {out['ratio_first_to_last']:.3f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["memory", "throughput", "cache", "all"], default="all")
    ap.add_argument("--pool", default=str(ROOT.parent / "shared/data/openworld/00000.tar"))
    ap.add_argument("--scratch", default=str(ROOT / "runs/bench/train"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/train.json"))
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--method", default="odsd")
    ap.add_argument("--batch", type=int, default=64, help="per worker; the plain loop uses 2x")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plain-steps", type=int, default=20)
    ap.add_argument("--feeds", nargs="+", default=["local", "ray_data"], choices=["local", "ray_data"],
                    help="distill.feed values measured by --part cache")
    ap.add_argument("--teachers", nargs="+", default=["resnet20"],
                    help="teacher archs measured by --part cache (resnet20: the quality benchmark's)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    ap.add_argument("--mem-batch", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    scratch = Path(args.scratch)
    res = {"cmd": " ".join(sys.argv), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M")}
    if args.part in ("throughput", "all"):
        res["throughput"] = bench_throughput(args, scratch / "throughput")
    if args.part in ("cache", "all"):
        res["cache"] = bench_cache(args, scratch / "cache")
    if args.part in ("memory", "all"):
        res["memory"] = bench_memory(args, scratch / "memory")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
