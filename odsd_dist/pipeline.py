"""`odsd run`: score -> sample -> distill -> eval from one config, each stage's output the next one's input.

Every check that needs no stage output runs first, so a bad key or path in any section fails with exit
code 2 before any Ray work. Each stage skips itself when its done.json matches its inputs and config,
so a rerun resumes.
"""
from __future__ import annotations

import sys
import time

from .config import Config, expand_paths
from .console import detail, log_path, say
from .distill import check_config, distill
from .errors import UserError
from .evaluate import evaluate
from .runner import Result
from .sample import sample
from .score import configured_shards, score


def check_all(cfg: Config) -> None:
    """Stage-independent checks of every section `odsd run` will use (no Ray)."""
    expand_paths(cfg.score.shards, "score.shards")
    if not cfg.eval.shards:
        raise UserError("eval.shards: no labelled evaluation shards configured (odsd run ends with eval)")
    expand_paths(cfg.eval.shards, "eval.shards")
    check_config(cfg)  # distill: method, options, student, teacher.weights, sizes


def run_all(cfg: Config) -> dict:
    """score -> sample -> distill -> eval, each stage's output passed to the next as its input."""
    check_all(cfg)
    for key, value in (("sample.scores", cfg.sample.scores), ("distill.selection", cfg.distill.selection)):
        if value:
            say(f"odsd run: {key} is for a stage run on its own; odsd run feeds each stage the one before's "
                "output")
    t0 = time.perf_counter()
    out: dict = {"stage_seconds": {}}

    def stage(name: str, fn, given) -> Result:
        detail(f"=== odsd run: {name} ===")
        ts = time.perf_counter()
        res = fn(given, cfg)
        out[name] = res.summary
        out["stage_seconds"][name] = round(time.perf_counter() - ts, 1)
        return res

    (shards,) = configured_shards(cfg)
    scores = stage("score", score, shards)
    selection = stage("sample", sample, scores.output)
    model = stage("distill", distill, selection.output.table)
    ev = stage("eval", evaluate, model.output).output
    out["seconds"] = round(time.perf_counter() - t0, 1)
    student, teacher = ev.get("top1"), ev.get("teacher_top1")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in out["stage_seconds"].items())
    lines = [f"odsd run: finished in {out['seconds']:.0f} s ({times})"]
    if student is not None:
        d = cfg.distill
        line = f"  student {ev.get('arch')} top-1 {100 * student:.2f}%"
        if teacher is not None:
            line += f"   teacher top-1 {100 * teacher:.2f}%"
        lines.append(line + f"   on {ev.get('n')} images of eval.shards")
        sel = "the whole pool" if cfg.sample.method == "all" else f"the {cfg.sample.method} selection (N={cfg.sample.n})"
        lines.append(f"  ({d.method} on {sel}, {d.workers} workers, ZeRO-{d.zero_stage}; {ev.get('weights')})")
    lines.append(f"  logs: {log_path(cfg.out, '<stage>')}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return out
