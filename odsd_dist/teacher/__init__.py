"""`odsd teacher train`: a plain-torch supervised teacher on labelled shards, saved as safetensors.

The shards are decoded once into uint8 memory (CIFAR-10: 150 MB); every batch is augmented on the
uint8 tensor (random crop with padding + horizontal flip, vectorised in torch), normalised with the
training-set statistics and fed to SGD (Nesterov) under a one-cycle or cosine schedule. A checkpoint
after every epoch makes a killed run resumable; the same config and seed give the same weights.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..console import detail, progress, say, verbose
from ..distill.augment import shift_flip
from ..errors import UserError
from ..models import build_model, load_model, normalize, read_model_meta, save_model, weights_sha256
from ..optim import sgd, warmup_cosine
from ..paths import expand_paths
from ..runner import Plan, Result, Stage, run_configured, run_stage, without
from ..shards.labelled import load_labelled
from ..stage import StageOutput, file_identity
from ..tables import atomic_write_json
from .config import TeacherTrainConfig

if TYPE_CHECKING:  # the top-level Config assembles this stage's section: a runtime import would loop
    from ..config import Config

CHECKPOINT = "teacher_checkpoint.safetensors"


# ----------------------------------------------------------------------------- data

def load_split(paths: list[str], size: int, channels: int, key: str,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """Decode labelled shards into (uint8 N×H×W×C, int64 N, class names or None); empty is a UserError naming `key`."""
    stats: dict = {}
    images, labels, names = load_labelled(paths, size, channels, progress=progress, stats=stats)
    if len(labels) == 0:
        raise UserError(f"{key}: no labelled samples (KEY.jpg + KEY.cls) in {len(paths)} shard(s); "
                        f"skipped {stats.get('skipped', {})}")
    return images, labels, names


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N×H×W×C images, in [0, 1] units (exact, float64 sums)."""
    x = torch.from_numpy(images).reshape(-1, images.shape[-1])
    s1 = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for chunk in torch.split(x, 1 << 22):
        c = chunk.double()
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    n = x.shape[0]
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v) / 255, 6) for v in mean], [round(float(v) / 255, 6) for v in std]


def augment_batch(x: torch.Tensor, padding: int, crop: bool, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a uint8 B×H×W×C batch (distill's weak-view gather)."""
    b = x.shape[0]
    if crop and padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen) - padding
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen) - padding
    else:
        dy = dx = torch.zeros(b, dtype=torch.long)
    flipped = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    return shift_flip(x, flipped, dx, dy, channels_last=True)


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, total: int, tc: TeacherTrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up, then cosine to zero."""
    start = 1 / 25 if tc.schedule == "onecycle" else 0.0
    return tc.lr * warmup_cosine(step, total, int(round(tc.warmup_frac * total)), start)


def make_optimizer(model: torch.nn.Module, tc: TeacherTrainConfig) -> torch.optim.SGD:
    """SGD (Nesterov) with weight decay on conv/linear weights only (not on BN and biases)."""
    params = list(model.parameters())
    return sgd([p for p in params if p.ndim > 1], no_decay=[p for p in params if p.ndim <= 1], lr=tc.lr,
               momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=tc.nesterov)


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, meta: dict, batch_size: int = 512,
            channels_last: bool = True) -> np.ndarray:
    """Argmax predictions (int64) for uint8 N×H×W×C images, batch by batch."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], meta)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out.append(model(x).argmax(1))
    return torch.cat(out).numpy() if out else np.empty((0,), np.int64)


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, meta: dict,
             batch_size: int = 512, channels_last: bool = True) -> tuple[float, list[float]]:
    """(top-1, per-class accuracy) of `model` on labelled arrays."""
    pred = predict(model, images, meta, batch_size, channels_last)
    correct = pred == labels
    c = int(meta["num_classes"])
    per = [float(correct[labels == k].mean()) if (labels == k).any() else float("nan") for k in range(c)]
    return float(correct.mean()), per


# ----------------------------------------------------------------------------- checkpoint

def _save_checkpoint(path: Path, model, opt, epoch: int, fingerprint: str, history: list) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{gi}.{pi}"] = buf.detach().contiguous()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"epoch": str(epoch), "fingerprint": fingerprint,
                                            "history": json.dumps(history)})
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, opt, fingerprint: str) -> Optional[tuple[int, list]]:
    """(epochs done, history) when `path` is a checkpoint of this exact run, else None (start over)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        state = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                if f"opt.{gi}.{pi}" in state:
                    opt.state[p]["momentum_buffer"] = state[f"opt.{gi}.{pi}"].clone()
        return int(meta["epoch"]), json.loads(meta.get("history", "[]"))
    except Exception as e:  # a damaged checkpoint is not fatal: train from scratch
        say(f"odsd teacher train: warning: ignoring unreadable checkpoint {path} ({e})")
        return None


# ----------------------------------------------------------------------------- training

def configured_shards(cfg: Config) -> tuple[list[str]]:
    """The labelled shards `teacher_train.shards` names (a stage run on its own)."""
    tc = cfg.teacher_train
    if not tc.shards:
        raise UserError("teacher_train.shards: no labelled shards given")
    return (expand_paths(tc.shards, "teacher_train.shards"),)


def _check_init(tc) -> Optional[dict]:
    """Metadata of `teacher_train.init` (UserError naming the key when unusable), or None."""
    if not tc.init:
        return None
    path = Path(tc.init)
    if not path.is_file():
        raise UserError(f"teacher_train.init: no such file {path}")
    try:
        meta = read_model_meta(path)
    except UserError as e:
        raise UserError(f"teacher_train.init: {e}") from None
    if meta.get("arch") != tc.arch or int(meta.get("in_chans", -1)) != tc.channels:
        raise UserError(f"teacher_train.init: {path} is {meta.get('arch')} with {meta.get('in_chans')} channels; "
                        f"teacher_train wants {tc.arch} with {tc.channels}")
    return meta


def plan(cfg: Config, shards: list[str]) -> Plan:
    """Validate the inputs, the weights path, the arch and `init` before decoding anything."""
    tc = cfg.teacher_train
    val = expand_paths(tc.val_shards, "teacher_train.val_shards") if tc.val_shards else []
    weights = Path(cfg.teacher.weights)
    if weights.suffix != ".safetensors":
        raise UserError(f"teacher.weights: {weights} must end in .safetensors")
    build_model(tc.arch, 2, tc.channels)  # unknown arch -> UserError before decoding anything
    section = tc.model_dump(mode="json")
    for k in ("progress", "resume", "threads", "eval_batch_size", "val_every"):
        section.pop(k)  # do not change the weights
    init_meta = _check_init(tc)
    return Plan(Path(tc.out) if tc.out else weights.parent,
                {"teacher_train": section, "seed": cfg.seed, "weights": str(weights)},
                {"shards": [file_identity(p) for p in shards],
                 "init_sha256": weights_sha256(Path(tc.init)) if tc.init else None},
                {"train": list(shards), "val": val, "weights": weights, "init_meta": init_meta})


def _reuse(plan: Plan, rec: dict) -> Optional[dict]:
    """done.json's summary while the weights it names are still the ones it trained."""
    weights = plan.work["weights"]
    ok = weights.is_file() and rec["summary"].get("weights_sha256") == weights_sha256(weights)
    return rec["summary"] if ok else None


def _load_data(cfg: Config, plan: Plan) -> tuple:
    """(images, labels, class names, (val images, val labels) or None) decoded from the shards."""
    tc = cfg.teacher_train
    detail(f"teacher: decoding {len(plan.work['train'])} training shard(s) ...")
    bars = tc.progress and verbose()
    images, labels, names = load_split(plan.work["train"], tc.input_size, tc.channels, "teacher_train.shards", bars)
    if tc.max_train_samples and tc.max_train_samples < len(labels):
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(labels))[:tc.max_train_samples])
        images, labels = images[keep], labels[keep]
    num_classes = len(names) if names else int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise UserError(f"teacher_train.shards: label {int(labels.max())} but only {num_classes} class names")
    names = names or [str(i) for i in range(num_classes)]
    val = None
    if plan.work["val"]:
        vx, vy, _ = load_split(plan.work["val"], tc.input_size, tc.channels, "teacher_train.val_shards", bars)
        val = (vx, vy)
    return images, labels, names, val


def _new_model(cfg: Config, init_meta: Optional[dict], images: np.ndarray, names: list[str]):
    """(model in the training memory format, its metadata): fresh with the seed, or from teacher_train.init."""
    tc = cfg.teacher_train
    mean, std = (init_meta["mean"], init_meta["std"]) if init_meta else channel_stats(images)
    mean, std = tc.mean or mean, tc.std or std
    if len(mean) != tc.channels or len(std) != tc.channels:
        raise UserError(f"teacher_train.mean/std: need {tc.channels} values each")
    meta = {"arch": tc.arch, "num_classes": len(names), "in_chans": tc.channels, "input_size": tc.input_size,
            "mean": mean, "std": std, "class_names": names}
    torch.manual_seed(cfg.seed)
    model = build_model(tc.arch, len(names), tc.channels)
    if init_meta:
        if int(init_meta["num_classes"]) != len(names):
            raise UserError(f"teacher_train.init: {tc.init} has {init_meta['num_classes']} classes, "
                            f"the shards have {len(names)}")
        model.load_state_dict(load_model(tc.init)[0].state_dict())
        detail(f"teacher: starting from {tc.init}")
    return model.to(memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format), meta


def _train_epoch(cfg: Config, epoch: int, model, opt, x_all: torch.Tensor, y_all: torch.Tensor, meta: dict,
                 bs: int, total_steps: int, bar) -> dict:
    """One epoch in a seeded order with seeded augmentation; its history record."""
    tc = cfg.teacher_train
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    crop, flip = tc.augment in ("crop_flip", "crop"), tc.augment in ("crop_flip", "flip")
    n = len(y_all)
    steps_per_epoch = n // bs
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    t0 = time.time()
    loss_sum, correct, seen = 0.0, 0, 0
    for i in range(steps_per_epoch):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch * steps_per_epoch + i, total_steps, tc)
        idx = order[i * bs:(i + 1) * bs]
        xb = normalize(augment_batch(x_all[idx], tc.crop_padding, crop, flip, gen), meta).contiguous(memory_format=fmt)
        yb = y_all[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=tc.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        bar.update(1)
        if i % 10 == 0 or i == steps_per_epoch - 1:
            bar.set_postfix_str(f"epoch {epoch + 1}/{tc.epochs}, loss {loss_sum / seen:.3f}, "
                                f"acc {correct / seen:.3f}, {seen / (time.time() - t0):.0f} img/s", refresh=False)
    if not math.isfinite(loss_sum):
        raise RuntimeError(f"teacher: loss diverged in epoch {epoch + 1}; lower teacher_train.lr")
    dt = time.time() - t0
    return {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4), "train_acc": round(correct / seen, 4),
            "seconds": round(dt, 1), "img_per_s": round(seen / dt, 1)}


def _run(cfg: Config, plan: Plan, stage: StageOutput) -> dict:
    """Train `teacher_train.arch` on the shards; write `teacher.weights`; the report."""
    tc = cfg.teacher_train
    weights, init_meta = plan.work["weights"], plan.work["init_meta"]
    threads = tc.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    t_start = time.time()
    images, labels, names, val = _load_data(cfg, plan)
    t_decode = time.time() - t_start
    model, meta = _new_model(cfg, init_meta, images, names)
    opt = make_optimizer(model, tc)
    n = len(labels)
    bs = min(tc.batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged last batch: BN statistics stay sane
    total_steps = steps_per_epoch * tc.epochs
    ckpt = stage.folder / CHECKPOINT
    first_epoch, history = 0, []
    if tc.resume:
        got = _load_checkpoint(ckpt, model, opt, stage.fingerprint)
        if got:
            first_epoch, history = got
            say(f"odsd teacher train: resuming after epoch {first_epoch} from {ckpt}")
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    detail(f"teacher: {tc.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), {n} images, "
           f"{len(names)} classes, {tc.epochs} epochs x {steps_per_epoch} steps of {bs}, {threads} threads")
    bar = progress(total=total_steps, initial=first_epoch * steps_per_epoch, desc="odsd teacher train", unit="step",
                   disable=not tc.progress)
    for epoch in range(first_epoch, tc.epochs):
        rec = _train_epoch(cfg, epoch, model, opt, x_all, y_all, meta, bs, total_steps, bar)
        if val is not None and ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs):
            rec["val_acc"] = round(accuracy(model, val[0], val[1], meta, tc.eval_batch_size, tc.channels_last)[0], 4)
        history.append(rec)
        detail("teacher: " + "  ".join(f"{k}={v}" for k, v in rec.items()))
        _save_checkpoint(ckpt, model, opt, epoch + 1, stage.fingerprint, history)
        atomic_write_json(stage.folder / "teacher_history.json", history)
    bar.close()
    val_acc, per_class = None, None
    if val is not None:
        val_acc, per_class = accuracy(model, val[0], val[1], meta, tc.eval_batch_size, tc.channels_last)
    model = model.to(memory_format=torch.contiguous_format).eval()
    save_model(model, weights, dict(
        meta, feature_dim=model.feature_dim, seed=cfg.seed, teacher_train=tc.model_dump(mode="json"), train_samples=n,
        val_acc=val_acc, val_per_class=per_class, trained_by="odsd teacher train",
        train_shards=[Path(p).name for p in plan.work["train"]], val_shards=[Path(p).name for p in plan.work["val"]]))
    train_s = sum(h["seconds"] for h in history)
    summary = {
        "weights": str(weights), "weights_sha256": weights_sha256(weights), "arch": tc.arch,
        "num_classes": len(names), "train_samples": n, "epochs": tc.epochs, "batch_size": bs,
        "threads": threads, "decode_seconds": round(t_decode, 1), "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "img_per_s": round(n * len(history) / train_s, 1) if train_s else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "val_acc": None if val_acc is None else round(val_acc, 4), "val_samples": 0 if val is None else len(val[1]),
        "resumed_from_epoch": first_epoch or None,
    }
    ckpt.unlink(missing_ok=True)  # the weights are saved: a rerun needs no checkpoint
    # the printed summary's extras; done.json keeps the rest
    return summary | {"class_names": names, "val_per_class": per_class}


def print_summary(s: dict) -> None:
    names, per_class = s.get("class_names"), s.get("val_per_class")
    lines = [f"odsd teacher train: {s['arch']}, {s['num_classes']} classes -> {s['weights']} "
             f"(sha256 {s['weights_sha256'][:12]})",
             f"  {s['train_samples']} training images, {s['epochs']} epochs x batch {s['batch_size']}; "
             f"{s['wall_seconds']:.0f} s wall (decode {s['decode_seconds']:.0f} s, train {s['train_seconds']:.0f} s, "
             f"{s['img_per_s']} img/s on {s['threads']} threads)",
             f"  train loss {s['final_train_loss']}, acc {s['final_train_acc']}"]
    if s["val_acc"] is not None:
        lines[-1] += f"; val top-1 {s['val_acc']:.4f} on {s['val_samples']} images"
        if per_class:
            lines.append("  val per class: " + ", ".join(f"{n} {a:.2f}" for n, a in zip(names, per_class)))
    print("\n".join(lines))


STAGE = Stage("teacher_train", "teacher train", inputs=configured_shards, plan=plan, run=_run,
              output=lambda plan, s: plan.work["weights"], print_summary=print_summary,
              stored=without("class_names", "val_per_class"), reuse=_reuse)


def train(shards: list[str], cfg: Config) -> Result:
    """Labelled shards -> the teacher (`Result.output`, teacher.weights)."""
    return run_stage(STAGE, cfg, shards)


def train_teacher(cfg: Config) -> dict:
    """`odsd teacher train`: on the shards `teacher_train.shards` names; the summary."""
    return run_configured(STAGE, cfg)
