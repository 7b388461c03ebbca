"""The sample stage: score table -> selection table (APS or a baseline), METHODS.md §1.2-1.3, §4.

`run_sample(cfg)` validates the score dir (UserError, exit 2, before any Ray work), skips a finished
identical run (done.json), runs the method as Ray Data passes with memory O(C*d + N), writes
`selection.parquet` sorted by (pred, key) with the config and teacher identity in its metadata,
optionally reshards the selected images, and prints a one-screen summary.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..console import progress
from ..stage import StageOutput
from ..tables import SELECTION_SCHEMA, _tmp_path, parquet_options, with_meta, write_table
from .blocks import PassTimer, col_np, count_scanned, run_pass
from .inputs import ScoreInput, open_scores
from .targets import low_noise_targets, to_list_array, topk_matrix

__all__ = ["run_sample", "select", "build_selection"]
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
    tmp = _tmp_path(path)
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
    from .aps import run_aps
    from .baselines import run_baseline

    if sc.method == "aps":
        cand, info = run_aps(inp.files, inp.rows, inp.num_classes, inp.feature_dim, sc.n, sc.aps, seed, sc.batch_rows, timer)
        by_score = sc.aps.weight_by_score
    else:
        cand, info = run_baseline(sc.method, inp.files, inp.rows, inp.num_classes, sc.n, seed, sc.batch_rows, timer)
        by_score = False
    return build_selection(cand, sc.targets.topk, sc.targets.tau, by_score), info  # candidates come in SELECTION_ORDER


def _print_summary(s: dict, names: list[str]) -> None:
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


def _export_metrics(per_class: list[int], names: list[str], seconds: float) -> None:
    try:
        from ..metrics import prom_metric

        g = prom_metric("odsd_sample_selected_per_class")
        for name, v in zip(names, per_class):
            g.labels(cls=name).set(v)
        prom_metric("odsd_sample_selection_seconds").set(seconds)
    except Exception:  # metrics never fail a stage
        pass


def run_sample(cfg) -> dict:
    """The `odsd sample` stage. Returns its summary dict (also stored in done.json)."""
    sc = cfg.sample
    score_dir = Path(sc.scores) if sc.scores else cfg.stage_dir("score")
    inp = open_scores(score_dir)
    out_dir = cfg.stage_dir("sample")
    reshard_sources = None
    if sc.reshard:
        from .reshard import resolve_sources

        reshard_sources = resolve_sources(sc.pool_shards or cfg.score.shards)
    section = {**cfg.section_dict("sample"), "seed": cfg.seed}
    stage = StageOutput(out_dir, "sample", section,
                        inputs={"scores": inp.identity(), "teacher_sha256": inp.teacher_sha256})
    rec = stage.done()
    if rec is not None:
        print(f"odsd sample: {out_dir} is up to date (done.json matches inputs and config); skipped")
        return rec["summary"]
    stage.start(full_config=cfg.to_dict())

    from ..raytools import init_ray

    init_ray(cfg.ray)
    t0 = time.perf_counter()
    timer = _ProgressTimer()
    path = out_dir / "selection.parquet"
    meta = {"stage": "sample", "config": section, "teacher_sha256": inp.teacher_sha256,
            "num_classes": inp.num_classes, "class_names": inp.class_names, "method": sc.method,
            "feature_dim": inp.feature_dim, "pool_rows": inp.rows, "scores": str(score_dir),
            "targets": {"topk": sc.targets.topk, "tau": sc.targets.tau}}
    if sc.method == "all":
        from .baselines import class_counts

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
        from .reshard import reshard

        sel = table if table is not None else pq.read_table(path, columns=["key", "shard", "url", "pred", "weight", "target_idx", "target_prob"])
        summary["reshard"] = reshard(sel, reshard_sources, Path(sc.reshard))
    _export_metrics(per_class, inp.class_names, seconds)
    stage.finish(summary)
    _print_summary(summary, inp.class_names)
    return summary
