"""`odsd distill`: train the student on the selection with Ray Train (TorchTrainer) + DeepSpeed ZeRO 0-3.

Every check a user can act on (method, teacher, selection, shards, sizes) runs before any Ray work.
The run is resumable: Ray Train restarts a failed worker group from the latest checkpoint
(`max_failures`), and a rerun of `odsd distill` after a crash finds the same run (named by the stage
fingerprint) under `<distill>/ray_results` and continues from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import ray
import torch

from ..console import detail, progress, say, worker_lines
from ..errors import UserError
from ..models import ARCHS, build_model, read_model_meta, weights_sha256
from ..paths import expand_paths
from ..raytools import threads_for
from ..runner import Plan, Result, Stage, run_configured, run_stage
from ..stage import StageOutput, file_identity
from ..tables import atomic_write_json, read_meta
from .config import RUNTIME_KEYS
from .data import epoch_feed, materialise, resolve_pool_shards
from .loop import train_loop
from .methods import Dims, method_class, registry
from .teacher_cache import build_teacher_cache, cache_folder, data_digest

# config.py imports this package's config (distill/config.py), so the top-level Config is for annotations
# only here. ray.train stays inside the function that starts the trainer: this package is imported by every
# config load, and ray.train is 0.7 of its 3.0 s (python -X importtime, 2026-11-30); DeepSpeed is imported
# only in the workers (loop.py).
if TYPE_CHECKING:
    from ..config import Config

__all__ = ["check_config", "distill", "run_distill"]


def check_config(cfg: Config) -> dict:
    """The checks that need no stage output (no Ray): method and options, student, teacher, device, sizes.

    `odsd run` calls it before the first stage starts, so a bad distill key fails before any Ray work.
    Returns {"method": class, "teacher_meta": dict, "shards": [...], "eval_shards": [...]} (the expanded
    distill.shards for source=shards, and eval.shards when evaluated every epoch; else []).
    """
    d = cfg.distill
    mcls = method_class(d.method)  # its options were validated with the config
    if d.student not in ARCHS and not d.student.startswith("timm:"):
        raise UserError(f"distill.student: unknown arch {d.student!r}; known: {', '.join(ARCHS)}")
    try:
        tmeta = read_model_meta(Path(cfg.teacher.weights))
    except UserError as e:
        raise UserError(f"teacher.weights: {e}") from None
    student = build_model(d.student, int(tmeta["num_classes"]), int(tmeta["in_chans"]))
    mcls.check(getattr(d.options, d.method), Dims.of(tmeta, student.feature_dim, int(tmeta["feature_dim"])),
               student)
    if d.device == "cuda":
        if not torch.cuda.is_available() and cfg.ray.address is None:
            raise UserError("distill.device=cuda but no CUDA device is visible (set distill.device=cpu)")
    if d.teacher_outputs == "cached" and not mcls.cached_teacher:
        raise UserError(f"distill.teacher_outputs=cached: method {d.method} needs the teacher at every step; "
                        f"use distill.teacher_outputs=online (cached works with: "
                        f"{', '.join(n for n, c in sorted(registry().items()) if c.cached_teacher)})")
    if d.source == "selection" and mcls.needs_labels:
        raise UserError(f"distill.method={d.method} needs labels: set distill.source=shards with labelled shards")
    shards = []
    if d.source == "shards":
        if not d.shards:
            raise UserError("distill.shards: source=shards needs the shards to train on")
        shards = expand_paths(d.shards, "distill.shards")
    eval_shards = expand_paths(cfg.eval.shards, "eval.shards") if (d.eval_every_epoch and cfg.eval.shards) else []
    ray_mod = sys.modules.get("ray")
    joined = ray_mod is not None and ray_mod.is_initialized()  # an already running Ray is checked in run_distill
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS") and not joined:  # a local Ray to be started
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        # Ray Data's read_parquet runs its file listing (V2) or metadata sampling (V1) as tasks that ask
        # for one whole CPU: with less than 1 CPU left beside the workers, every epoch's read waits forever.
        need = d.workers * d.worker_cpus + max(d.data_cpus, 1.0)
        if need > cpus:
            raise UserError(f"distill.worker_cpus: {d.workers} workers x worker_cpus {d.worker_cpus} = "
                            f"{d.workers * d.worker_cpus:g} CPUs leaves less than the 1 CPU Ray Data needs to read "
                            f"the training data, of the local Ray's {cpus} (ray.num_cpus); lower distill.worker_cpus "
                            f"(a reservation, not a limit: each worker still runs distill.threads threads)")
    return {"method": mcls, "teacher_meta": tmeta, "shards": shards, "eval_shards": eval_shards}


def configured_selection(cfg: Config) -> tuple[Path]:
    """The selection `distill.selection` names, else the sample stage's (a stage run on its own)."""
    d = cfg.distill
    return (Path(d.selection) if d.selection else cfg.stage_dir("sample") / "selection.parquet",)


def plan(cfg: Config, selection: Path | None) -> Plan:
    """Validate the config and inputs (no Ray); the Plan's work is what the run needs.

    `selection` is what the student trains on with distill.source=selection; unused with source=shards."""
    d = cfg.distill
    checked = check_config(cfg)
    mcls, tmeta = checked["method"], checked["teacher_meta"]
    tpath = Path(cfg.teacher.weights)
    shard_paths = []
    if d.source == "selection":
        selection = Path(selection)
        if not selection.is_file():
            raise UserError(f"distill: selection not found: {selection} (run `odsd sample` first, or set distill.selection)")
        for w in mcls.selection_warnings(getattr(d.options, d.method), read_meta(selection)):
            say(f"odsd distill: warning: {w}")
        pool = d.pool_shards or cfg.score.shards
        if not pool:
            raise UserError("distill.pool_shards (or score.shards): the pool shards the selection was drawn from")
        pool_paths = expand_paths(pool, "distill.pool_shards" if d.pool_shards else "score.shards")
        wanted = sorted(set(pq.read_table(selection, columns=["shard"]).column("shard").to_pylist()))
        if not wanted:
            raise UserError(f"distill: the selection {selection} is empty")
        shard_paths = resolve_pool_shards(wanted, pool_paths)
    else:
        selection, shard_paths = None, checked["shards"]
    eval_shards = checked["eval_shards"]
    config = {k: v for k, v in cfg.section_dict("distill").items() if k not in RUNTIME_KEYS and k != "out"}
    sha = weights_sha256(tpath)
    inputs = {"teacher_sha256": sha, "seed": cfg.seed,
              "selection": file_identity(selection) if selection else None,
              "shards": [file_identity(p) for p in shard_paths],
              "eval_shards": [file_identity(p) for p in eval_shards]}
    return Plan(cfg.stage_dir("distill"), config, inputs,
                {"method": mcls, "teacher_meta": tmeta, "teacher_sha256": sha, "selection": selection,
                 "shard_paths": shard_paths, "eval_shards": eval_shards})


def _run(cfg: Config, run_plan: Plan, stage: StageOutput) -> dict:
    """Materialise the training data, run the TorchTrainer, write student.safetensors + history.json."""
    d = cfg.distill
    folder, plan = run_plan.folder, run_plan.work
    t0 = time.perf_counter()

    _check_resources(d)
    tmeta = plan["teacher_meta"]
    size, chans = int(tmeta["input_size"]), int(tmeta["in_chans"])
    data = materialise(folder / "train_data", selection=plan["selection"], shard_paths=plan["shard_paths"],
                       size=size, channels=chans, max_pixels=cfg.score.max_pixels,
                       decode_batch_size=d.decode_batch_size, data_cpus=d.data_cpus,
                       with_labels=plan["method"].needs_labels, reduced=cfg.score.reduced_decode)
    train_dir = folder / "train_data"
    if d.teacher_outputs == "cached":
        c = d.cache
        cache_dir, cache_inputs = cache_folder(
            Path(c.dir) if c.dir else folder / "teacher_cache", data=data_digest(plan["selection"], plan["shard_paths"]),
            teacher_sha256=plan["teacher_sha256"], views=c.views, topk=c.topk, feature_dim=c.feature_dim, seed=c.seed,
            pad=d.augment.weak_pad, flip=d.augment.flip, size=size)
        cache = build_teacher_cache(cache_dir, train_dir, cache_inputs, weights=str(Path(cfg.teacher.weights).resolve()),
                                    batch_size=c.batch_size, actor_cpus=c.actor_cpus,
                                    threads=threads_for(c.threads, c.actor_cpus), device=d.device)
        detail(f"odsd distill: teacher outputs cached: {cache['rows']} images x {d.cache.views} views "
               f"({cache['seconds']:.0f} s)")
        train_dir = cache_dir
    rows = data["rows"]
    spe = (rows // d.workers) // d.batch_size
    if spe < 1:
        raise UserError(f"distill: {rows} training images are fewer than workers x batch_size = "
                        f"{d.workers} x {d.batch_size}")
    total = d.steps if d.steps is not None else d.epochs * spe
    threads = threads_for(d.threads, d.worker_cpus)
    student_meta = {k: tmeta[k] for k in ("input_size", "mean", "std", "class_names") if k in tmeta}
    student_meta.update({"arch": d.student, "num_classes": tmeta["num_classes"], "in_chans": tmeta["in_chans"]})
    spec = {
        "distill": d.model_dump(mode="json"), "seed": cfg.seed, "teacher_weights": str(Path(cfg.teacher.weights).resolve()),
        "teacher_sha256": plan["teacher_sha256"], "student_meta": student_meta, "threads": threads,
        "train_dir": str(train_dir.resolve()), "rows": rows, "steps_per_epoch": spe,
        "total_steps": total, "batch_size": d.batch_size, "workers": d.workers, "views": plan["method"].views(getattr(d.options, d.method)),
        "augment": d.augment.model_dump(mode="json"), "mean": list(tmeta.get("mean") or [0.0] * chans),
        "std": list(tmeta.get("std") or [1.0] * chans), "data_cpus": d.data_cpus,
        "aug_batch_rows": max(d.batch_size, 64), "eval_shards": plan["eval_shards"],
        "eval_every_epoch": d.eval_every_epoch, "out_dir": str(folder.resolve()),
        "epochs_per_pass": d.epochs_per_pass,
    }
    detail(f"odsd distill: {rows} images, {d.workers} workers x batch {d.batch_size}, {spe} steps/epoch, "
           f"{total} steps, ZeRO-{d.zero_stage} {d.dtype} on {d.device}, method {d.method}")
    spec["feed"] = epoch_feed(spec) if d.feed == "ray_data" else None
    result = _fit(cfg, spec, stage.fingerprint, folder)
    history = _collect(result, folder)
    summary = {
        "method": d.method, "student": d.student, "steps": history["step"], "configured_steps": total,
        "epochs": -(-total // spe), "steps_per_epoch": spe, "rows": rows, "workers": d.workers,
        "zero_stage": d.zero_stage, "dtype": d.dtype, "last_top1": (history["evals"][-1]["top1"] if history["evals"] else None),
        "best_top1": (history["best"] or {}).get("top1"), "resumes": len(history["resumes"]),
        "samples_per_s": _mean_sps(history), "seconds": round(time.perf_counter() - t0, 1),
        "weights": str(folder / "student.safetensors"),
    }
    return summary


def _check_resources(d) -> None:
    """Training workers plus one data task must fit the cluster, else the run would wait forever."""
    res = ray.cluster_resources()
    need = d.workers * d.worker_cpus + d.data_cpus
    if res.get("CPU", 0) < need:
        raise UserError(f"distill: {d.workers} workers x worker_cpus {d.worker_cpus} + data_cpus {d.data_cpus} = "
                        f"{need:g} CPUs, but the Ray cluster has {res.get('CPU', 0):g}: lower distill.worker_cpus "
                        f"or distill.workers")
    if d.device == "cuda" and res.get("GPU", 0) < d.workers:
        raise UserError(f"distill: {d.workers} workers need {d.workers} GPUs; the Ray cluster has {res.get('GPU', 0):g}")


def _fit(cfg: Config, spec: dict, run_fp: str, folder: Path):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # 0.7 s: above
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distill
    use_gpu = d.device == "cuda"
    resources = {"CPU": d.worker_cpus} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=d.resolved_backend()),
        run_config=RunConfig(
            name=f"distill-{run_fp}", storage_path=str((folder / "ray_results").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
            failure_config=FailureConfig(max_failures=d.max_failures),
            # Ray Train's per-report and per-checkpoint INFO lines drown the progress lines on the console
            # (its log files keep everything); warnings and errors still show
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
                                             "OMP_NUM_THREADS": str(spec["threads"])}},
        ),
    )
    epochs = -(-spec["total_steps"] // spec["steps_per_epoch"])
    with progress(total=spec["total_steps"], desc="odsd distill", unit="step") as bar, \
            worker_lines(lambda line: _on_worker_line(line, bar, epochs)):
        return trainer.fit()


# what rank 0 of the training loop prints (loop.py `_say`), followed by the driver's progress bar
_STEP = re.compile(r"\[distill\] step (\d+)/(\d+) epoch (\d+)")
_EVAL = re.compile(r"\[distill\] eval after epoch \d+: top-1 ([\d.]+%)")
_RESUMED = re.compile(r"\[distill\] resumed from checkpoint at step (\d+)")


def _on_worker_line(line: str, bar, epochs: int) -> None:
    if m := _RESUMED.search(line):
        say(f"odsd distill: resumed from the checkpoint at step {m.group(1)}")
        bar.update(int(m.group(1)) - bar.n)
        return
    if m := _STEP.search(line):
        bar.update(int(m.group(1)) - bar.n)
        bar.epoch = f"epoch {int(m.group(3)) + 1}/{epochs}"
    elif m := _EVAL.search(line):
        bar.top1 = f", top-1 {m.group(1)}"
    else:
        return
    bar.set_postfix_str(getattr(bar, "epoch", "") + getattr(bar, "top1", ""))


def _collect(result, folder: Path) -> dict:
    """Copy the student and the loop state out of the final checkpoint; write history.json."""
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as ck:
        ck = Path(ck)
        state = json.loads((ck / "train_state.json").read_text())
        tmp = folder / ".student.safetensors.tmp"
        shutil.copyfile(ck / "student.safetensors", tmp)
        tmp.replace(folder / "student.safetensors")
    atomic_write_json(folder / "history.json", state)
    return state


def _mean_sps(history: dict) -> float | None:
    vals = [h["samples_per_s"] for h in history["history"][1:]] or [h["samples_per_s"] for h in history["history"]]
    return round(sum(vals) / len(vals), 2) if vals else None


def print_summary(s: dict) -> None:
    lines = ["odsd distill: done", f"  {s['method']} -> {s['student']} ({s['weights']}): {s['steps']} steps ({s.get('epochs')} epochs), "
                   f"ZeRO-{s['zero_stage']} {s['dtype']} x {s['workers']} workers"]
    if s.get("last_top1") is not None:
        lines.append(f"  eval top-1: last {100 * s['last_top1']:.2f}%  best {100 * s['best_top1']:.2f}%")
    if s.get("samples_per_s"):
        lines.append(f"  throughput {s['samples_per_s']:.1f} samples/s; resumes from checkpoints: {s['resumes']}")
    print("\n".join(lines), file=sys.stderr)


STAGE = Stage("distill", "distill", inputs=configured_selection, plan=plan, run=_run,
              output=lambda plan, s: Path(s["weights"]), print_summary=print_summary, needs_ray=True)


def distill(selection: Path | None, cfg: Config) -> Result:
    """A selection table -> the student (`Result.output`, student.safetensors)."""
    return run_stage(STAGE, cfg, selection)


def run_distill(cfg: Config) -> dict:
    """`odsd distill`: on the selection the config names; the summary."""
    return run_configured(STAGE, cfg)
