"""The Ray Train worker loop: one DeepSpeed engine per worker, steps over the epoch feed, checkpoints,
per-epoch evaluation and the final consolidated student.

Nothing here is method-specific: each step is the method's `train_step` (methods/base.py), which takes
its own optimizer steps through a StepContext (step.py) and returns named terms; every term is logged.
The method's aux modules (and their optimizers) are checkpointed beside the DeepSpeed files. All ranks
call `ray.train.report` the same number of times (each report carries a DeepSpeed checkpoint saved by
every rank into its own folder; Ray merges them).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

TAG = "ckpt"  # DeepSpeed checkpoint tag inside every Ray checkpoint
STATE = "train_state.json"  # loop state (step, history, resumes) beside the DeepSpeed files


def _setup_env(spec: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec["distill"]["device"] == "cuda" else "cpu")
    threads = spec["threads"]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    # keep the console to one progress line per log step: DeepSpeed's calls of deprecated torch.distributed
    # names warn at every collective (Ray Train's own INFO lines: RunConfig.logging_config in __init__.py)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed  # noqa: F401  (creates its logger at INFO: quieten it after the import)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _say(msg: str) -> None:
    """One line to the worker's stdout (forwarded to the driver once; Ray Train's print patch would tee it twice)."""
    print(msg, file=sys.__stdout__, flush=True)


def _to_device(batch: dict, device, dtype, channels_last: bool = False) -> dict:
    """Batch tensors on the device; images in the run's dtype, and channels-last when asked (the activation
    layout is what speeds up oneDNN/cuDNN convolutions; parameters stay contiguous for ZeRO's flat buffers)."""
    import torch

    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if v.is_floating_point() and k not in ("weight", "tgt_prob", "t_val"):
            v = v.to(dtype)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _mean_terms(sums: dict, counts: dict, device) -> dict:
    """Average the summed terms over the steps that produced each and over ranks (one small all-reduce).

    Terms a method returns only on some steps (MosaicKD's generator losses) are averaged over those steps.
    """
    import torch
    import torch.distributed as dist

    names = sorted(sums)
    t = torch.tensor([sums[n] / max(counts[n], 1) for n in names], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {n: float(v) for n, v in zip(names, t.tolist())}


def train_loop(spec: dict) -> None:
    """Ray Train `train_loop_per_worker`; `spec` is a plain dict made by distill/__init__.py."""
    _setup_env(spec)
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from ..metrics import ray_metric
    from ..models import build_model, load_model
    from .config import DistillConfig
    from .data import local_pass, train_index
    from .engine import DistillModule, build_engine, full_student_state
    from . import method_dims
    from .methods import build_method
    from .step import StepContext

    dcfg = DistillConfig.model_validate(spec["distill"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if dcfg.device == "cuda" else torch.device("cpu")
    if dcfg.device == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if dcfg.dtype == "bf16" else torch.float32
    import deepspeed

    deepspeed.init_distributed(dist_backend=dcfg.resolved_backend())

    teacher, tmeta = load_model(spec["teacher_weights"], map_location=device)
    teacher.requires_grad_(False)
    teacher.to(dtype)
    teacher_dim = teacher.feature_dim
    if dcfg.teacher_outputs == "cached":  # the stored outputs stand in for it: keep it off the device
        teacher_dim = min(teacher_dim, dcfg.cache.feature_dim)
        teacher = None
    torch.manual_seed(spec["seed"])  # identical initial student + heads on every rank
    student = build_model(dcfg.student, int(tmeta["num_classes"]), int(tmeta["in_chans"]))
    dims = method_dims(tmeta, student.feature_dim, teacher_dim)
    method = build_method(dcfg.method, dcfg.options, dims)  # aux modules: same seed, same weights on every rank
    module = DistillModule(student, method, teacher).to(device)
    total, spe = spec["total_steps"], spec["steps_per_epoch"]
    engine = build_engine(module, dcfg, world, total)
    ctx = StepContext(engine, teacher, method, seed=spec["seed"], rank=rank, world=world, total_steps=total,
                      dtype=dtype, device=device)

    state = {"step": 0, "history": [], "evals": [], "resumes": [], "best": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            ctx.load(Path(d))
            state = json.loads((Path(d) / STATE).read_text())
        state["resumes"].append({"from_step": state["step"], "rank_pid": os.getpid(),
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if rank == 0:
            _say(f"[distill] resumed from checkpoint at step {state['step']} / {total}")

    m_step = ray_metric("odsd_distill_step_seconds")
    m_sps = ray_metric("odsd_distill_samples_per_second")
    m_loss = ray_metric("odsd_distill_loss")
    m_stat = ray_metric("odsd_distill_stat")
    m_eval = ray_metric("odsd_eval_top1_ratio")
    feed = spec["feed"]  # None: the local feed (data.local_pass), planned from train_data's index read here
    units = train_index(spec["train_dir"]) if feed is None else None
    out_dir = Path(spec["out_dir"])
    bs = dcfg.batch_size

    def write_pid() -> None:
        pid_dir = out_dir / "workers"
        pid_dir.mkdir(parents=True, exist_ok=True)
        tmp = pid_dir / f".rank{rank}.{os.getpid()}"
        tmp.write_text(json.dumps({"pid": os.getpid(), "step": state["step"], "rank": rank}))
        os.replace(tmp, pid_dir / f"rank{rank}.json")

    def evaluate_now() -> Optional[dict]:
        """Consolidate (collective), then rank 0 evaluates the exact weights that will be saved."""
        sd = full_student_state(engine)
        if rank != 0 or not spec["eval_shards"]:
            return None
        from ..evaluate import evaluate_model

        model = build_model(dcfg.student, int(tmeta["num_classes"]), int(tmeta["in_chans"]))
        model.load_state_dict(sd)
        res = evaluate_model(model.eval(), spec["student_meta"], spec["eval_shards"], dcfg.eval_batch_size)
        return res

    def report(metrics: dict, final: bool = False) -> None:
        """DeepSpeed checkpoint on every rank into its own folder, then one ray.train.report."""
        with tempfile.TemporaryDirectory(prefix=f"odsd-ckpt-r{rank}-") as tmp:
            engine.save_checkpoint(tmp, tag=TAG)
            if rank == 0:
                (Path(tmp) / STATE).write_text(json.dumps(state))
                ctx.save(Path(tmp))
                if final:
                    from ..models import save_model

                    sd = metrics.pop("_state_dict")
                    model = build_model(dcfg.student, int(tmeta["num_classes"]), int(tmeta["in_chans"]))
                    model.load_state_dict(sd)
                    save_model(model, Path(tmp) / "student.safetensors", spec["student_meta"] | {
                        "method": dcfg.method, "steps": state["step"], "teacher_sha256": spec["teacher_sha256"],
                        "eval_top1": (state["evals"][-1]["top1"] if state["evals"] else None),
                        "best_top1": (state["best"] or {}).get("top1")})
            metrics.pop("_state_dict", None)
            # one folder name for every rank: Ray merges the ranks' files into one checkpoint
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{state['step']:08d}")
        write_pid()

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t_log, n_log = time.perf_counter(), 0
    if ckpt is not None:
        write_pid()
    while state["step"] < total:
        pass_start = state["step"]
        # either feed hands exactly n_pass x bs rows in training order (data.pass_items): no shuffle here,
        # batch k of the pass is step pass_start + k on every run
        if feed is None:
            batches, pass_end = local_pass(spec, units, pass_start, rank)
        else:
            it, pass_end = ray.get(feed.split.remote(pass_start, rank))
            batches = it.iter_torch_batches(batch_size=bs, drop_last=True, prefetch_batches=2)
        n_pass = pass_end - pass_start
        done_in_pass = 0
        for batch in batches:
            t0 = time.perf_counter()
            batch = _to_device(batch, device, dtype, dcfg.channels_last)
            ctx.step = state["step"]
            terms = method.train_step(batch, ctx)
            dt = time.perf_counter() - t0
            state["step"] += 1
            done_in_pass += 1
            n_log += bs
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            m_step.observe(dt)
            step = state["step"]
            epoch = (step - 1) // spe
            epoch_end = step % spe == 0 or step == total
            if step % dcfg.log_every == 0 or epoch_end or step % dcfg.checkpoint_every == 0:
                now = time.perf_counter()
                sps = n_log / max(now - t_log, 1e-9)
                terms_mean = _mean_terms(sums, counts, device)
                m_sps.set(sps, tags={"rank": str(rank)})
                m_stat.set(engine.get_lr()[0], tags={"term": "lr"})
                for k, v in terms_mean.items():
                    (m_stat if k in method.stats else m_loss).set(v, tags={"term": k})
                entry = {"step": step, "epoch": epoch, "lr": engine.get_lr()[0], "loss": terms_mean,
                         "samples_per_s_rank": sps, "samples_per_s": sps * world, "time": time.time()}
                state["history"].append(entry)
                if rank == 0:
                    _say(f"[distill] step {step}/{total} epoch {epoch} " + " ".join(
                        f"{k}={v:.4f}" for k, v in terms_mean.items()) + f" {sps * world:.1f} samples/s")
                sums, counts, t_log, n_log = {}, {}, now, 0
            if epoch_end:
                res = evaluate_now() if spec["eval_every_epoch"] else None
                if rank == 0 and res is not None:
                    ev = {"epoch": epoch, "step": step, "top1": res["top1"], "n": res["n"],
                          "per_class": res["per_class"]}
                    state["evals"].append(ev)
                    if state["best"] is None or ev["top1"] > state["best"]["top1"]:
                        state["best"] = {"epoch": epoch, "step": step, "top1": ev["top1"]}
                    m_eval.set(ev["top1"], tags={"which": "last"})
                    m_eval.set(state["best"]["top1"], tags={"which": "best"})
                    _say(f"[distill] eval after epoch {epoch}: top-1 {100 * ev['top1']:.2f}% "
                         f"(best {100 * state['best']['top1']:.2f}%)")
                if step < total:
                    report({"step": step, "epoch": epoch, **_last_eval(state)})
                t_log, n_log = time.perf_counter(), 0  # evaluation and checkpoint time is not throughput
            elif step % dcfg.checkpoint_every == 0:
                report({"step": step, "epoch": epoch, **_last_eval(state)})
                t_log, n_log = time.perf_counter(), 0
            if done_in_pass >= n_pass:
                break
        if done_in_pass < n_pass:
            raise RuntimeError(f"rank {rank}: the data ran out after {done_in_pass} of {n_pass} steps "
                               f"of the pass starting at step {pass_start}")
    # final: consolidated student (collective), saved by rank 0 into the last checkpoint
    sd = full_student_state(engine)
    report({"step": state["step"], "final": True, **_last_eval(state), "_state_dict": sd}, final=True)
    if dist.is_initialized():
        dist.barrier()


def _last_eval(state: dict) -> dict:
    out = {}
    if state["evals"]:
        out["eval_top1"] = state["evals"][-1]["top1"]
    if state["best"]:
        out["best_top1"] = state["best"]["top1"]
    return out
