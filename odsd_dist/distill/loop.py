"""The Ray Train worker loop: one DeepSpeed engine per worker, steps over the epoch feed, checkpoints,
per-epoch evaluation and the final consolidated student.

Nothing here is method-specific: each step is the method's `train_step` (methods/base.py), which takes
its own optimizer steps through a StepContext (step.py) and returns named terms; every term is logged.
The method's aux modules (and their optimizers) are checkpointed beside the DeepSpeed files. All ranks
call `ray.train.report` the same number of times (each report carries a DeepSpeed checkpoint saved by
every rank into its own folder; Ray merges them).

The worker functions import torch, DeepSpeed and the model code themselves, on purpose: DS_ACCELERATOR and
OMP_NUM_THREADS are set first (`_setup_env`), and DeepSpeed's import (3 s) stays off the driver.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .data import local_pass, train_index
from .engine import full_student_state

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
    Worker(spec).run()


class TermMeans:
    """The loop's running sums of every term since the last log line, and the samples counted for its rate."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.t0, self.samples = time.perf_counter(), 0

    def add(self, terms: dict, samples: int) -> None:
        self.samples += samples
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
            self.counts[k] = self.counts.get(k, 0) + 1

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time is not throughput."""
        self.t0, self.samples = time.perf_counter(), 0


class Worker:
    """One training process: its DeepSpeed engine, the method's step context, the loop state that is
    checkpointed (step, history, evals, best, resumes) and the metrics it exports."""

    def __init__(self, spec: dict):
        import deepspeed
        import ray.train
        import torch

        from ..metrics import ray_metric
        from .config import DistillConfig

        self.spec = spec
        self.dcfg = d = DistillConfig.model_validate(spec["distill"])
        tctx = ray.train.get_context()
        self.rank, self.world = tctx.get_world_rank(), tctx.get_world_size()
        self.device = torch.device("cuda", tctx.get_local_rank()) if d.device == "cuda" else torch.device("cpu")
        if d.device == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if d.dtype == "bf16" else torch.float32
        deepspeed.init_distributed(dist_backend=d.resolved_backend())
        self.total, self.spe = spec["total_steps"], spec["steps_per_epoch"]
        self._build_engine()
        self.state = {"step": 0, "history": [], "evals": [], "resumes": [], "best": None}
        self.resumed = self._resume()
        self.m = {k: ray_metric(f"odsd_{k}") for k in ("distill_step_seconds", "distill_samples_per_second",
                                                      "distill_loss", "distill_stat", "eval_top1_ratio")}
        self.feed = spec["feed"]  # None: the local feed (data.local_pass), planned from train_data's index
        self.units = train_index(spec["train_dir"]) if self.feed is None else None
        self.out_dir = Path(spec["out_dir"])

    def _build_engine(self) -> None:
        """Teacher (off the device when its outputs are cached), student, method and engine: the same
        initial weights on every rank."""
        import torch

        from ..models import build_model, load_model
        from .engine import DistillModule, build_engine
        from .methods import Dims, build_method
        from .step import StepContext

        d, spec = self.dcfg, self.spec
        teacher, self.tmeta = load_model(spec["teacher_weights"], map_location=self.device)
        teacher.requires_grad_(False)
        teacher.to(self.dtype)
        teacher_dim = teacher.feature_dim
        if d.teacher_outputs == "cached":  # the stored outputs stand in for it
            teacher_dim = min(teacher_dim, d.cache.feature_dim)
            teacher = None
        torch.manual_seed(spec["seed"])
        student = build_model(d.student, int(self.tmeta["num_classes"]), int(self.tmeta["in_chans"]))
        self.method = build_method(d.method, d.options, Dims.of(self.tmeta, student.feature_dim, teacher_dim))
        self.engine = build_engine(DistillModule(student, self.method, teacher).to(self.device), d, self.world,
                                   self.total)
        self.ctx = StepContext(self.engine, teacher, self.method, seed=spec["seed"], rank=self.rank,
                               world=self.world, total_steps=self.total, dtype=self.dtype, device=self.device)

    def _resume(self) -> bool:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            self.engine.load_checkpoint(d, tag=TAG)
            self.ctx.load(Path(d))
            self.state = json.loads((Path(d) / STATE).read_text())
        self.state["resumes"].append({"from_step": self.state["step"], "rank_pid": os.getpid(),
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if self.rank == 0:
            _say(f"[distill] resumed from checkpoint at step {self.state['step']} / {self.total}")
        return True

    # ------------------------------------------------------------------------------------------ the loop

    def batches(self, pass_start: int):
        """(batches, end step) of this rank's pass: either feed hands exactly (end - start) x batch_size rows
        in training order (data.pass_items), so batch k of the pass is step pass_start + k on every run."""
        import ray

        if self.feed is None:
            return local_pass(self.spec, self.units, pass_start, self.rank)
        it, pass_end = ray.get(self.feed.split.remote(pass_start, self.rank))
        return it.iter_torch_batches(batch_size=self.dcfg.batch_size, drop_last=True, prefetch_batches=2), pass_end

    def run(self) -> None:
        import torch.distributed as dist

        d, state, means = self.dcfg, self.state, TermMeans()
        if self.resumed:
            self.write_pid()
        while state["step"] < self.total:
            pass_start = state["step"]
            batches, pass_end = self.batches(pass_start)
            done = 0
            for batch in batches:
                t0 = time.perf_counter()
                self.ctx.step = state["step"]
                terms = self.method.train_step(_to_device(batch, self.device, self.dtype, d.channels_last), self.ctx)
                self.m["distill_step_seconds"].observe(time.perf_counter() - t0)
                state["step"] += 1
                done += 1
                means.add(terms, d.batch_size)
                self.after_step(state["step"], means)
                if done >= pass_end - pass_start:
                    break
            if done < pass_end - pass_start:
                raise RuntimeError(f"rank {self.rank}: the data ran out after {done} of {pass_end - pass_start} "
                                   f"steps of the pass starting at step {pass_start}")
        # final: consolidated student (collective), saved by rank 0 into the last checkpoint
        sd = full_student_state(self.engine)
        self.report({"step": state["step"], "final": True, **_last_eval(state), "_state_dict": sd}, final=True)
        if dist.is_initialized():
            dist.barrier()

    def after_step(self, step: int, means: TermMeans) -> None:
        """Log, evaluate at an epoch's end, checkpoint: in the same order on every rank."""
        d = self.dcfg
        epoch = (step - 1) // self.spe
        epoch_end = step % self.spe == 0 or step == self.total
        if step % d.log_every == 0 or epoch_end or step % d.checkpoint_every == 0:
            self.log(step, epoch, means)
        if epoch_end:
            if self.spec["eval_every_epoch"]:
                self.evaluate(step, epoch)
            if step < self.total:
                self.report({"step": step, "epoch": epoch, **_last_eval(self.state)})
            means.restart_clock()
        elif step % d.checkpoint_every == 0:
            self.report({"step": step, "epoch": epoch, **_last_eval(self.state)})
            means.restart_clock()

    def log(self, step: int, epoch: int, means: TermMeans) -> None:
        now = time.perf_counter()
        sps = means.samples / max(now - means.t0, 1e-9)
        terms = _mean_terms(means.sums, means.counts, self.device)
        lr = self.engine.get_lr()[0]
        self.m["distill_samples_per_second"].set(sps, tags={"rank": str(self.rank)})
        self.m["distill_stat"].set(lr, tags={"term": "lr"})
        for k, v in terms.items():
            self.m["distill_stat" if k in self.method.stats else "distill_loss"].set(v, tags={"term": k})
        self.state["history"].append({"step": step, "epoch": epoch, "lr": lr, "loss": terms, "samples_per_s_rank": sps,
                                      "samples_per_s": sps * self.world, "time": time.time()})
        if self.rank == 0:
            _say(f"[distill] step {step}/{self.total} epoch {epoch} " + " ".join(
                f"{k}={v:.4f}" for k, v in terms.items()) + f" {sps * self.world:.1f} samples/s")
        means.reset()

    # ------------------------------------------------------------------------- evaluation and checkpoints

    def student(self, state_dict: dict):
        from ..models import build_model

        model = build_model(self.dcfg.student, int(self.tmeta["num_classes"]), int(self.tmeta["in_chans"]))
        model.load_state_dict(state_dict)
        return model

    def evaluate(self, step: int, epoch: int) -> None:
        """Consolidate (collective), then rank 0 evaluates the exact weights that will be saved."""
        from ..evaluate import evaluate_model

        sd = full_student_state(self.engine)
        if self.rank != 0 or not self.spec["eval_shards"]:
            return
        res = evaluate_model(self.student(sd).eval(), self.spec["student_meta"], self.spec["eval_shards"],
                             self.dcfg.eval_batch_size)
        state = self.state
        ev = {"epoch": epoch, "step": step, "top1": res["top1"], "n": res["n"], "per_class": res["per_class"]}
        state["evals"].append(ev)
        if state["best"] is None or ev["top1"] > state["best"]["top1"]:
            state["best"] = {"epoch": epoch, "step": step, "top1": ev["top1"]}
        self.m["eval_top1_ratio"].set(ev["top1"], tags={"which": "last"})
        self.m["eval_top1_ratio"].set(state["best"]["top1"], tags={"which": "best"})
        _say(f"[distill] eval after epoch {epoch}: top-1 {100 * ev['top1']:.2f}% "
             f"(best {100 * state['best']['top1']:.2f}%)")

    def report(self, metrics: dict, final: bool = False) -> None:
        """DeepSpeed checkpoint on every rank into its own folder, then one ray.train.report."""
        import ray.train

        from ..models import save_model

        state = self.state
        with tempfile.TemporaryDirectory(prefix=f"odsd-ckpt-r{self.rank}-") as tmp:
            self.engine.save_checkpoint(tmp, tag=TAG)
            sd = metrics.pop("_state_dict", None)
            if self.rank == 0:
                (Path(tmp) / STATE).write_text(json.dumps(state))
                self.ctx.save(Path(tmp))
                if final:
                    save_model(self.student(sd), Path(tmp) / "student.safetensors", self.spec["student_meta"] | {
                        "method": self.dcfg.method, "steps": state["step"], "teacher_sha256": self.spec["teacher_sha256"],
                        "eval_top1": (state["evals"][-1]["top1"] if state["evals"] else None),
                        "best_top1": (state["best"] or {}).get("top1")})
            # one folder name for every rank: Ray merges the ranks' files into one checkpoint
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{state['step']:08d}")
        self.write_pid()

    def write_pid(self) -> None:
        pid_dir = self.out_dir / "workers"
        pid_dir.mkdir(parents=True, exist_ok=True)
        tmp = pid_dir / f".rank{self.rank}.{os.getpid()}"
        tmp.write_text(json.dumps({"pid": os.getpid(), "step": self.state["step"], "rank": self.rank}))
        os.replace(tmp, pid_dir / f"rank{self.rank}.json")


def _last_eval(state: dict) -> dict:
    out = {}
    if state["evals"]:
        out["eval_top1"] = state["evals"][-1]["top1"]
    if state["best"]:
        out["best_top1"] = state["best"]["top1"]
    return out
