"""`odsd run`: score -> sample -> distill -> eval from one config, and nothing else.

Each stage skips itself when its done.json matches its inputs and config, so a rerun resumes.
"""
from __future__ import annotations

import sys
import time

from .config import Config


def run_all(cfg: Config) -> dict:
    from .distill import run_distill
    from .evaluate import run_eval
    from .sample import run_sample
    from .score import run_score

    t0 = time.perf_counter()
    out = {}
    for name, fn in (("score", run_score), ("sample", run_sample), ("distill", run_distill), ("eval", run_eval)):
        print(f"\n=== odsd run: {name} ===", file=sys.stderr)
        out[name] = fn(cfg)
    out["seconds"] = time.perf_counter() - t0
    ev = out["eval"] or {}
    student, teacher = ev.get("top1"), ev.get("teacher_top1")
    print("\nodsd run — finished in %.0f s" % out["seconds"], file=sys.stderr)
    if student is not None:
        line = f"  student top-1 {100 * student:.2f}%"
        if teacher is not None:
            line += f"   teacher top-1 {100 * teacher:.2f}%"
        print(line, file=sys.stderr)
    return out
