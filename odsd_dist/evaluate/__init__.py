"""`odsd eval`: top-1 and per-class accuracy of a model on labelled shards (METHODS.md §5).

Streams the shards batch by batch (memory bounded by the batch). The teacher's accuracy on the same
shards is reported beside the student's, cached by (teacher sha256, shard identities).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from ..console import progress
from ..errors import UserError
from ..models import load_model, normalize, read_model_meta, weights_sha256
from ..paths import expand_paths
from ..runner import Plan, Result, Stage, run_configured, run_stage, without
from ..shards.labelled import iter_labelled_batches
from ..shards.tario import iter_samples
from ..stage import StageOutput, file_identity, fingerprint
from ..tables import atomic_write_json

if TYPE_CHECKING:  # the top-level Config assembles this stage's section: a runtime import would loop
    from ..config import Config


def evaluate_model(model, meta: dict, shard_paths: Sequence[str], batch_size: int = 256,
                   device: str = "cpu", bar=None) -> dict:
    """{"top1", "per_class": {class name: accuracy}, "n", "skipped"} of `model` on labelled shards
    (`bar`: a progress bar advanced by the images of each batch)."""
    c = int(meta["num_classes"])
    names = list(meta.get("class_names") or [str(i) for i in range(c)])
    correct = np.zeros(c, np.int64)
    seen = np.zeros(c, np.int64)
    stats: dict = {}
    model.eval()
    with torch.no_grad():
        for x, y in iter_labelled_batches(list(shard_paths), size=int(meta["input_size"]),
                                          channels=int(meta["in_chans"]), batch_size=batch_size, stats=stats,
                                          num_classes=c):
            pred = model(normalize(x, meta, device)).argmax(1).cpu().numpy()
            np.add.at(seen, y, 1)
            np.add.at(correct, y, (pred == y).astype(np.int64))
            if bar is not None:
                bar.update(len(y))
    n = int(seen.sum())
    return {
        "top1": float(correct.sum() / n) if n else 0.0,
        "per_class": {names[i]: (float(correct[i] / seen[i]) if seen[i] else None) for i in range(c)},
        "n": n,
        "skipped": dict(stats.get("skipped", {})),
    }


def _count_entries(shards: Sequence[str]) -> int:
    """Entries in the shards (a read without decoding), for the progress bar's total."""
    return sum(1 for p in shards for _ in iter_samples(p, errors=[]))


def _teacher_accuracy(cfg: Config, shards: list[str], folder: Path, bar=None) -> Optional[dict]:
    """The teacher's accuracy on `shards`, computed once per (teacher sha256, shards)."""
    path = Path(cfg.teacher.weights)
    if not path.is_file():
        return None
    sha = weights_sha256(path)
    key = fingerprint({"teacher": sha, "shards": [file_identity(p) for p in shards]})
    cache = folder / "teacher_cache" / f"{key}.json"
    try:
        return json.loads(cache.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    teacher, meta = load_model(path)
    if bar is not None:
        bar.total += bar.n  # the teacher: as many images again
        bar.set_description("odsd eval (student + teacher)", refresh=False)
    res = evaluate_model(teacher, meta, shards, cfg.eval.batch_size, bar=bar) | {"teacher_sha256": sha}
    atomic_write_json(cache, res)
    return res


def configured_student(cfg: Config) -> tuple[Path]:
    """The distill stage's student (a stage run on its own; `odsd eval --weights` names another)."""
    return (cfg.stage_dir("distill") / "student.safetensors",)


def plan(cfg: Config, weights: Path) -> Plan:
    """Validate eval.shards and the model (no Ray)."""
    if not cfg.eval.shards:
        raise UserError("eval.shards: no labelled evaluation shards configured")
    shards = expand_paths(cfg.eval.shards, "eval.shards")
    wpath = Path(weights)
    if not wpath.is_file():
        hint = " (run `odsd distill` first)" if wpath == configured_student(cfg)[0] else ""
        raise UserError(f"eval: model weights not found: {wpath}{hint}")
    read_model_meta(wpath)  # UserError when not an odsd safetensors file
    return Plan(cfg.stage_dir("eval"), cfg.section_dict("eval"),
                {"weights": file_identity(wpath), "shards": [file_identity(p) for p in shards],
                 "teacher": file_identity(cfg.teacher.weights) if Path(cfg.teacher.weights).is_file() else None},
                {"weights": wpath, "shards": shards})


def _reuse(plan: Plan, rec: dict) -> Optional[dict]:
    """The finished run's eval.json (done.json keeps it without the per-class accuracies)."""
    try:
        return json.loads((plan.folder / "eval.json").read_text())
    except FileNotFoundError:
        return None


def _run(cfg: Config, plan: Plan, stage: StageOutput) -> dict:
    """Evaluate the model and the teacher; writes eval.json; the record."""
    t0 = time.perf_counter()
    wpath, shards = plan.work["weights"], plan.work["shards"]
    model, meta = load_model(wpath)
    with progress(total=_count_entries(shards), desc="odsd eval", unit="img") as bar:
        res = evaluate_model(model, meta, shards, cfg.eval.batch_size, bar=bar)
        bar.total = bar.n  # the images that were labelled and readable
        teacher = _teacher_accuracy(cfg, shards, plan.folder, bar)
    summary = {
        "weights": str(wpath), "arch": meta.get("arch"), "top1": res["top1"], "n": res["n"],
        "per_class": res["per_class"], "skipped": res["skipped"],
        "teacher_top1": teacher["top1"] if teacher else None,
        "teacher_per_class": teacher["per_class"] if teacher else None,
        "method": meta.get("method"), "steps": meta.get("steps"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(plan.folder / "eval.json", summary)
    return summary


def print_summary(s: dict) -> None:
    line = f"odsd eval: {s.get('arch')} top-1 {100 * s['top1']:.2f}% on {s['n']} images"
    if s.get("teacher_top1") is not None:
        line += f"; teacher {100 * s['teacher_top1']:.2f}%"
    print(line, file=sys.stderr)
    pc = s.get("per_class") or {}
    if pc:
        print("  per class: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pc.items() if v is not None),
              file=sys.stderr)


STAGE = Stage("eval", "eval", inputs=configured_student, plan=plan, run=_run, output=lambda plan, s: s,
              print_summary=print_summary, stored=without("per_class", "teacher_per_class"), reuse=_reuse)


def evaluate(student: Path, cfg: Config) -> Result:
    """Model weights -> the eval record (`Result.output`, what eval.json holds)."""
    return run_stage(STAGE, cfg, student)


def run_eval(cfg: Config, weights: Optional[str] = None) -> dict:
    """`odsd eval`: `weights` (default: the distilled student) on eval.shards; the record."""
    return evaluate(Path(weights), cfg).summary if weights else run_configured(STAGE, cfg)
