"""The sample stage: score table -> selection table (APS or a baseline), METHODS.md §1.2-1.3, §4.

`sample(scores, cfg)` (on the runner: odsd_dist/runner.py) validates the score dir (UserError, exit 2,
before any Ray work), skips a finished identical run (done.json), runs the method as Ray Data passes with
memory O(C*d + N), writes `selection.parquet` sorted by (pred, key) with the config and teacher identity in
its metadata, optionally reshards the selected images, and prints a one-screen summary.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..console import progress
from ..metrics import prom_metric
from ..runner import Plan, Result, Stage, run_configured, run_stage
from ..stage import StageOutput
from ..tables import SELECTION_SCHEMA, parquet_options, temp_path, with_meta, write_table
from .aps import run_aps
from .baselines import class_counts, run_baseline
from .columns import col_np
from .inputs import ScoreInput, open_scores
from .passes import PassTimer, count_scanned, run_pass
from .reshard import reshard, resolve_sources
from .targets import low_noise_targets, to_list_array, topk_matrix

__all__ = ["Selection", "build_selection", "run_sample", "sample", "select"]
CLASSES_LISTED = 40  # the summary lists each class up to this many


def _weights(score: np.ndarray, by_score: bool) -> np.ndarray:
    if not by_score or len(score) == 0:
        return np.ones(len(score), np.float32)
    w = 1.0 / (1.0 + np.exp(-score.astype(np.float64)))
    return (w / w.mean()).astype(np.float32)


def build_selection(cand: pa.Table, k: int, tau: float, weight_by_score: bool = False) -> pa.Table:
    """Candidates (key, shard, url, pred, topk_idx, topk_logit, _rank) -> SELECTION_SCHEMA rows, in their order."""
    n = cand.num_rows
    score = cand.column("_rank").to_numpy().astype(np.float32) if "_rank" in cand.column_names else col_np(cand, "maxprob", np.float32)
    if n:
        idx, prob = low_noise_targets(topk_matrix(cand.column("topk_idx"), np.int32),
                                      topk_matrix(cand.column("topk_logit"), np.float32), k, tau)
    else:
        idx, prob = np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    t = pa.table(
        {
            "key": cand.column("key"), "shard": cand.column("shard"), "url": cand.column("url"),
            "pred": cand.column("pred").cast(pa.int32()), "score": pa.array(score, pa.float32()),
            "weight": pa.array(_weights(score, weight_by_score), pa.float32()),
            "target_idx": to_list_array(idx, pa.int32()), "target_prob": to_list_array(prob, pa.float32()),
        },
        schema=SELECTION_SCHEMA,
    )
    return t


def _all_block(batch: pa.Table, k: int, tau: float) -> pa.Table:
    count_scanned(batch.num_rows)
    return build_selection(batch, k, tau)


def _write_all(inp: ScoreInput, sc, path: Path, meta: dict, timer: PassTimer) -> int:
    """`all`: stream every row, in score-table order (shard file, row), straight to the file."""
    tmp = temp_path(path)
    rows = 0
    writer = pq.ParquetWriter(tmp, with_meta(SELECTION_SCHEMA.empty_table(), meta).schema, **parquet_options(SELECTION_SCHEMA))
    try:
        def consume(t: pa.Table):
            nonlocal rows
            writer.write_table(t.cast(SELECTION_SCHEMA))
            rows += t.num_rows

        cols = ["key", "shard", "url", "pred", "maxprob", "topk_idx", "topk_logit"]
        timer.run("all", inp.rows, run_pass(inp.files, cols, _all_block, dict(k=sc.targets.topk, tau=sc.targets.tau),
                                            sc.batch_rows, preserve_order=True), consume)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows


def select(inp: ScoreInput, sc, seed: int, timer: PassTimer) -> tuple[pa.Table, dict]:
    """Run the configured method; (selection table sorted by (pred, key), info)."""
    if sc.method == "aps":
        cand, info = run_aps(inp.files, inp.rows, inp.num_classes, inp.feature_dim, sc.n, sc.aps, seed, sc.batch_rows, timer)
        by_score = sc.aps.weight_by_score
    else:
        cand, info = run_baseline(sc.method, inp.files, inp.rows, inp.num_classes, sc.n, seed, sc.batch_rows, timer)
        by_score = False
    return build_selection(cand, sc.targets.topk, sc.targets.tau, by_score), info  # candidates come in SELECTION_ORDER


def print_summary(s: dict) -> None:
    names = s["class_names"]
    print(f"odsd sample: method={s['method']} selected={s['selected']:,} of pool={s['pool_rows']:,} "
          f"(N={s['n']:,}, C={len(names)})")
    quotas = s.get("quotas") if s.get("quotas") and len(s["quotas"]) == len(names) else [None] * len(names)
    cands = s.get("candidates") or [None] * len(names)
    cells = []
    for i, name in enumerate(names):
        q = "" if quotas[i] is None else f"/{quotas[i]:,}"
        c = "" if cands[i] is None else f"/{cands[i]:,}"
        cells.append(f"{name[:15]} {s['per_class'][i]:,}{q}{c}")
    if len(cells) <= CLASSES_LISTED:
        print("  per class (selected/quota/candidates):")
        for row in range(0, len(cells), 4):
            print("    " + "".join(f"{c:<26}" for c in cells[row:row + 4]).rstrip())
    else:  # ImageNet-size C: the range here, every class in done.json and the selection's metadata
        per = s["per_class"]
        print(f"  per class selected {min(per):,}-{max(per):,} (every class in {Path(s['selection']).parent / 'done.json'})")
    for r in s.get("rounds") or []:
        if "rows_per_class" in r:  # the rows each class's next prototypes came from
            used = r["rows_per_class"]
            print(f"  round {r['round']}: next prototypes from {min(used):,}-{max(used):,} rows per class "
                  f"({r['refined_classes']:,} classes from a refine pass); {r['prototypes_moved']:,} moved")
    print(f"  rows scanned {s['rows_scanned']:,} in {len(s['passes'])} passes; {s['seconds']:.2f} s; "
          f"{s['rows_per_second']:,} pool rows/s")
    print(f"  wrote {s['selection']}" + (f"; resharded into {s['reshard']['folder']}" if s.get("reshard") else ""))


class _ProgressTimer(PassTimer):
    """PassTimer with the stage's progress bar: pool rows read, over all passes (each pass adds its rows)."""

    def __init__(self):
        super().__init__()
        self.bar = None

    def run(self, name, rows, it, consume) -> None:
        if self.bar is None:
            self.bar = progress(total=rows, desc="odsd sample", unit="row", unit_scale=True)
        else:
            self.bar.total += rows
        self.bar.set_postfix_str(f"pass {len(self.passes) + 1}: {name}")
        super().run(name, rows, it, consume)
        self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _export_metrics(s: dict) -> None:
    g = prom_metric("odsd_sample_selected_per_class")
    for name, v in zip(s["class_names"], s["per_class"]):
        g.labels(cls=name).set(v)
    prom_metric("odsd_sample_selection_seconds").set(s["seconds"])


@dataclass(frozen=True)
class Selection:
    """The sample stage's output: the selection table, and the selected images as shards when resharded."""

    table: Path  # selection.parquet
    images: Optional[Path] = None  # sample.reshard's folder of training shards, else None


def configured_scores(cfg) -> tuple[Path]:
    """The score folder `sample.scores` names, else the score stage's folder (a stage run on its own)."""
    return (Path(cfg.sample.scores) if cfg.sample.scores else cfg.stage_dir("score"),)


def plan(cfg, scores: Path) -> Plan:
    """Validate the score folder (UserError, exit 2) and the reshard sources; no Ray."""
    sc = cfg.sample
    inp = open_scores(scores)
    reshard_sources = resolve_sources(sc.pool_shards or cfg.score.shards) if sc.reshard else None
    section = {**cfg.section_dict("sample"), "seed": cfg.seed}
    return Plan(cfg.stage_dir("sample"), section, {"scores": inp.identity(), "teacher_sha256": inp.teacher_sha256},
                {"inp": inp, "scores": Path(scores), "reshard_sources": reshard_sources})


def _run(cfg, plan: Plan, stage: StageOutput) -> dict:
    """Select, write selection.parquet (and reshard when asked); the summary."""
    sc = cfg.sample
    inp, reshard_sources = plan.work["inp"], plan.work["reshard_sources"]
    t0 = time.perf_counter()
    timer = _ProgressTimer()
    path = plan.folder / "selection.parquet"
    meta = {"stage": "sample", "config": plan.config, "teacher_sha256": inp.teacher_sha256,
            "num_classes": inp.num_classes, "class_names": inp.class_names, "method": sc.method,
            "feature_dim": inp.feature_dim, "pool_rows": inp.rows, "scores": str(plan.work["scores"]),
            "targets": {"topk": sc.targets.topk, "tau": sc.targets.tau}}
    if sc.method == "all":
        counts = class_counts(inp.files, inp.num_classes, sc.batch_rows, timer, inp.rows)
        info = {"candidates": counts.tolist(), "quotas": counts.tolist()}
        meta.update(per_class=counts.tolist(), **info)
        selected = _write_all(inp, sc, path, meta, timer)
        per_class = counts.tolist()
        table = None
    else:
        table, info = select(inp, sc, cfg.seed, timer)
        per_class = np.bincount(table.column("pred").to_numpy(), minlength=inp.num_classes)[: inp.num_classes].tolist()
        meta.update(per_class=per_class, candidates=info.get("candidates"), quotas=info.get("quotas"),
                    aps=info.get("z") and {"z": info["z"], "sample_rows": info["sample_rows"], "rounds": info["rounds"],
                                            "floors_too_high": info["floors_too_high"]})
        write_table(table, path, meta)
        selected = table.num_rows
    timer.close()
    seconds = time.perf_counter() - t0
    summary = {
        "method": sc.method, "n": sc.n, "selected": selected, "pool_rows": inp.rows, "per_class": per_class,
        "class_names": inp.class_names, "quotas": info.get("quotas"), "candidates": info.get("candidates"),
        "rows_scanned": timer.rows_scanned, "passes": timer.passes, "seconds": round(seconds, 3),
        "rows_per_second": int(inp.rows / seconds) if seconds > 0 else None, "selection": str(path),
        "rounds": info.get("rounds"), "buffer_peak_rows": info.get("buffer_peak_rows"),  # the merge buffer (APS)
    }
    if reshard_sources is not None:
        sel = table if table is not None else pq.read_table(path, columns=["key", "shard", "url", "pred", "weight", "target_idx", "target_prob"])
        summary["reshard"] = reshard(sel, reshard_sources, Path(sc.reshard))
    return summary


def _output(plan: Plan, s: dict) -> Selection:
    return Selection(Path(s["selection"]), Path(s["reshard"]["folder"]) if s.get("reshard") else None)


STAGE = Stage("sample", "sample", inputs=configured_scores, plan=plan, run=_run, output=_output,
              print_summary=print_summary, needs_ray=True, metrics=_export_metrics)


def sample(scores: Path, cfg) -> Result:
    """A score folder -> the selection (`Result.output`, a `Selection`)."""
    return run_stage(STAGE, cfg, scores)


def run_sample(cfg) -> dict:
    """`odsd sample`: on the score folder the config names; the summary (also stored in done.json)."""
    return run_configured(STAGE, cfg)
