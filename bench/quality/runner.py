"""Driving the project's own stages for every row: teacher -> score once -> (tune on val) -> per seed
sample -> distill -> eval on test.

Each stage is called as a function with a config built from the base odsd config plus `--set`
overrides (exactly what `odsd <stage> --config base.yaml --set ...` would run), so every stage keeps
its own skip-when-done and resume behaviour: rerunning the benchmark only does what is missing.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from odsd_dist.config import Config, build_config, expand_paths
from odsd_dist.errors import UserError
from odsd_dist.stage import file_identity, fingerprint
from odsd_dist.tables import atomic_write_json

from .config import QualityConfig, RowSpec
from .ledger import Ledger, content_digest, stable_base
from .report import git_commit
from .rows import Row, as_text, fixed_key_violations, get_row, known_rows
from .splits import cut_splits


def say(msg: str) -> None:
    print(f"quality: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- rows

@dataclass
class Plan:
    row: Row
    grid: dict = field(default_factory=dict)  # key -> candidate values (tuned on val)
    seeds: Optional[list[int]] = None  # the row's own seeds (None: the config's)


def resolve_rows(qc: QualityConfig, only: Optional[list[str]] = None) -> list[Plan]:
    """The config's rows, looked up in the registry (or defined inline), with their tuning grids."""
    plans, seen = [], set()
    for spec in qc.rows:
        spec = RowSpec(name=spec) if isinstance(spec, str) else spec
        if spec.name in seen:
            raise UserError(f"rows: {spec.name!r} is listed twice")
        seen.add(spec.name)
        try:
            row = get_row(spec.name)
        except KeyError:
            if spec.source is None:
                raise UserError(f"rows: unknown row {spec.name!r} (known: {', '.join(known_rows())}); "
                                f"a new row needs `source: pool|train` and `set: {{key: value}}`") from None
            row = Row(spec.name, spec.label or spec.name, spec.source, dict(spec.set), spec.group or "custom",
                      spec.what or "")
        else:
            row = replace(row, label=spec.label or row.label, set={**row.set, **spec.set},
                          source=spec.source or row.source, group=spec.group or row.group, what=spec.what or row.what)
        bad = fixed_key_violations(row.set)
        if bad:
            raise UserError(f"rows.{row.name}: {', '.join(bad)} is shared by every row and set once in `odsd:`")
        grid = {}
        if qc.tune.rows is None or row.name in qc.tune.rows:
            grid.update(qc.tune.grid)
        grid.update(row.grid)
        grid.update(spec.grid)
        bad = fixed_key_violations(grid)
        if bad:
            raise UserError(f"tune grid of {row.name}: {', '.join(bad)} is shared by every row; not tunable")
        for k, vals in grid.items():
            if not isinstance(vals, list) or not vals:
                raise UserError(f"tune grid of {row.name}: {k} needs a non-empty list of values")
        plans.append(Plan(row, grid, spec.seeds))
    if only:
        unknown = [n for n in only if n not in seen]
        if unknown:
            raise UserError(f"--rows: {', '.join(unknown)} not in the config's rows ({', '.join(seen)})")
        plans = [p for p in plans if p.row.name in only]
    for src, dsts in qc.tune.share.items():
        stray = [n for n in [src, *dsts] if n not in seen]
        if stray:
            raise UserError(f"tune.share: {', '.join(stray)} not in the config's rows")
    if qc.tune.rows:
        stray = [n for n in qc.tune.rows if n not in seen]
        if stray:
            raise UserError(f"tune.rows: {', '.join(stray)} not in the config's rows")
    return plans


def candidates(grid: dict) -> list[dict]:
    """Every combination of the grid as typed values (keys sorted); [{}] for an empty grid."""
    keys = sorted(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] or [{}]


# ----------------------------------------------------------------------------------------- setup

@dataclass
class Setup:
    out: Path
    base: dict
    splits: dict
    teacher: str
    teacher_sha256: str
    score_dir: str
    pool: list[str]
    score_summary: dict
    teacher_summary: Optional[dict] = None
    ledger: Ledger = field(default_factory=lambda: Ledger(None, {}))


def _cfg(base: dict, values: dict, **more) -> Config:
    """The base config with a row's typed values and more of them (dotted keys spelled with `__` for `.`)."""
    return build_config(base, [], {**values, **{k.replace("__", "."): v for k, v in more.items()}})


def prepare(qc: QualityConfig) -> Setup:
    """Splits, teacher and the score table: done once, shared by every row and seed."""
    from odsd_dist.models import read_model_meta, weights_sha256

    out = Path(qc.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(qc.odsd)
    splits = cut_splits(qc.data, out / "data")
    pool = expand_paths((base.get("score") or {}).get("shards") or [], "odsd.score.shards")
    cfg0 = _cfg(base, {})
    teacher = cfg0.teacher.weights
    teacher_summary = None
    if qc.teacher.train:
        from odsd_dist.teacher import train_teacher

        sets = {}
        if not cfg0.teacher_train.shards:
            sets["teacher_train__shards"] = expand_paths(qc.data.train, "data.train")
        if not cfg0.teacher_train.val_shards:  # progress only; the teacher's settings come from the config
            sets["teacher_train__val_shards"] = splits["val"]
        say(f"training the teacher -> {teacher}")
        teacher_summary = train_teacher(_cfg(base, {}, **sets))
    if not Path(teacher).is_file():
        raise UserError(f"odsd.teacher.weights: {teacher} not found (set teacher.train: true to train it)")
    read_model_meta(teacher)
    sha = weights_sha256(teacher)
    if qc.score_dir:
        from odsd_dist.sample.inputs import open_scores

        inp = open_scores(qc.score_dir)
        if inp.teacher_sha256 != sha:
            raise UserError(f"score_dir: {qc.score_dir} was scored by another teacher "
                            f"({inp.teacher_sha256[:12]} != {sha[:12]} of {teacher})")
        names = {Path(p).name[:-4] for p in pool}
        have = {Path(f).stem for f in inp.files}
        if have - names:
            raise UserError(f"score_dir: {qc.score_dir} holds shards not in odsd.score.shards: "
                            f"{', '.join(sorted(have - names)[:5])}")
        score_dir = str(qc.score_dir)
        score_summary = json.loads((Path(score_dir) / "done.json").read_text()).get("summary", {})
        say(f"reusing the score table {score_dir} ({inp.rows:,} rows)")
    else:
        from odsd_dist.score import run_score

        score_dir = str(out / "score")
        score_summary = run_score(_cfg(base, {}, score__out=score_dir))
    return Setup(out, base, splits, teacher, sha, score_dir, pool, score_summary, teacher_summary,
                 open_ledger(qc, base, sha, pool))


def open_ledger(qc: QualityConfig, base: dict, teacher_sha: str, pool: list[str]) -> Ledger:
    """The config's ledger (none without `ledger:`), keyed by the inputs' content (bench/quality/ledger.py)."""
    if not qc.ledger:
        return Ledger(None, {})
    t0 = time.perf_counter()
    d = qc.data
    data = {"val_size": d.val_size, "train_size": d.train_size, "split_seed": d.split_seed,
            "shard_size": d.shard_size}
    for name in ("train", "test", "val"):
        paths = expand_paths(getattr(d, name), f"data.{name}") if getattr(d, name) else []
        data[name] = content_digest(paths)
    key = {"mode": qc.mode, "base": stable_base(base), "data": data, "teacher": teacher_sha,
           "pool": content_digest(pool)}
    led = Ledger(qc.ledger, key, (git_commit(Path(__file__).resolve().parents[2])["commit"] or "")[:12] or None)
    have = len(list(Path(qc.ledger).glob("*/*.json")))
    say(f"ledger {qc.ledger}: {have} finished run records; inputs hashed in {time.perf_counter() - t0:.1f} s")
    return led


# ----------------------------------------------------------------------------------------- one run

def run_id(row: Row, extra: dict) -> str:
    """Folder name of a row + tuned values: `base` without any, else a short hash of them as text."""
    return "base" if not extra else "t" + fingerprint(sorted(as_text(extra)))[:10]


def _sample_dir(setup: Setup, cfg: Config) -> Path:
    sec = {k: v for k, v in cfg.section_dict("sample").items() if k not in ("out", "scores")}
    key = fingerprint({"sample": sec, "seed": cfg.seed, "scores": setup.score_dir})[:12]
    return setup.out / "samples" / f"{cfg.sample.method}-{key}"


def run_one(setup: Setup, row: Row, extra: dict, seed: int, test: bool) -> dict:
    """sample (pool rows) -> distill (per-epoch eval on val) -> eval on test (when `test`)."""
    from odsd_dist.distill import run_distill

    rid = run_id(row, extra)
    hit = setup.ledger.get(row, rid, extra, seed)
    if hit is not None:
        say(f"[{row.name} seed {seed}] taken from the ledger (finished {hit['ledger']['finished_at']} "
            f"at commit {hit['ledger']['commit']})")
        return hit
    folder = setup.out / "runs" / row.name / f"{rid}-s{seed}"
    common = dict(seed=seed, teacher__weights=str(setup.teacher), score__shards=setup.pool,
                  eval__shards=setup.splits["val"], distill__eval_every_epoch=True,
                  distill__out=str(folder / "distill"),
                  distill__keep_checkpoints=100000)  # a runtime key: keeps the best-validation epoch's checkpoint
    overrides = {**row.set, **extra}
    rec: dict = {"row": row.name, "seed": seed, "overrides": as_text(row.set) + as_text(extra), "folder": str(folder)}
    t0 = time.perf_counter()
    if row.source == "pool":
        sdir = _sample_dir(setup, _cfg(setup.base, overrides, **common))
        cfg = _cfg(setup.base, overrides, **common, sample__scores=str(setup.score_dir), sample__out=str(sdir),
                   distill__source="selection", distill__selection=str(sdir / "selection.parquet"))
        from odsd_dist.sample import run_sample

        say(f"[{row.name} seed {seed}] sample: {cfg.sample.method} -> {sdir}")
        s = run_sample(cfg)
        rec["sample"] = {k: s.get(k) for k in ("method", "n", "selected", "pool_rows", "per_class", "seconds")}
    else:
        cfg = _cfg(setup.base, overrides, **common, distill__source="shards", distill__shards=setup.splits["train"])
        rec["sample"] = None
    say(f"[{row.name} seed {seed}] distill: {cfg.distill.method} ({cfg.distill.source}) -> {folder / 'distill'}")
    d = run_distill(cfg)
    rec["distill"] = d
    hist_path = folder / "distill" / "history.json"
    hist = json.loads(hist_path.read_text()) if hist_path.is_file() else {}
    evals = hist.get("evals") or []
    rec["val"] = {"last": evals[-1]["top1"] if evals else d.get("last_top1"),
                  "best": (hist.get("best") or {}).get("top1", d.get("best_top1")),
                  "best_epoch": (hist.get("best") or {}).get("epoch"),
                  "best_step": (hist.get("best") or {}).get("step"),
                  "curve": [{"epoch": e["epoch"], "step": e["step"], "top1": e["top1"]} for e in evals]}
    rec["train_curve"] = [{"step": h["step"], "epoch": h["epoch"], "loss": h["loss"].get("total"),
                           "samples_per_s": h.get("samples_per_s")} for h in hist.get("history") or []]
    if test:
        rec["test"] = evaluate_test(setup, cfg, folder, rec)
    rec["wall_s"] = round((rec["sample"] or {}).get("seconds", 0) + (d.get("seconds") or 0)
                          + ((rec.get("test") or {}).get("seconds") or 0), 1)
    rec["bench_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(folder / "run.json", rec)
    if test:
        setup.ledger.put(row, rid, extra, seed, rec)
    return rec


def best_val_student(cfg: Config, folder: Path, rec: dict) -> Optional[Path]:
    """The student at the best-validation epoch as a safetensors file, or None when the run did not keep it.

    Preferred: `<distill>/student_best.safetensors`, if the distill stage writes one. Otherwise the
    epoch-end Ray Train checkpoint of that step (the benchmark keeps them all): for ZeRO 0-2 in fp32 the
    DeepSpeed module state holds the full student (equal to the saved student at the last step), read
    with torch.load(weights_only=True) from the run's own folder and written as safetensors beside it.
    """
    dist = folder / "distill"
    own = dist / "student_best.safetensors"
    if own.is_file():
        return own
    step = rec["val"].get("best_step")
    d = cfg.distill
    if step is None or d.zero_stage > 2 or d.dtype != "fp32":
        return None
    out = folder / f"student_best_val_step{step}.safetensors"
    if out.is_file():
        return out
    cks = sorted(dist.glob(f"ray_results/*/checkpoint_{int(step):08d}/ckpt/mp_rank_00_model_states.pt"))
    if not cks:
        return None
    import torch

    from odsd_dist.models import build_model, read_model_meta, save_model

    meta = read_model_meta(dist / "student.safetensors")
    state = torch.load(cks[-1], map_location="cpu", weights_only=True)["module"]
    sd = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    model = build_model(meta["arch"], int(meta["num_classes"]), int(meta["in_chans"]))
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    keep = {k: meta[k] for k in ("arch", "num_classes", "in_chans", "input_size", "mean", "std", "class_names",
                                 "method", "teacher_sha256") if k in meta}
    save_model(model.eval(), out, keep | {"steps": int(step), "note": "best validation epoch (quality bench)"})
    return out


def evaluate_test(setup: Setup, cfg: Config, folder: Path, rec: dict) -> dict:
    """Top-1 on the test split of the final student (`last`) and of the student at the epoch with the
    best validation accuracy (`at_best_val`, when kept). Cached by the weights' identity."""
    from odsd_dist.evaluate import run_eval

    cache = folder / "test.json"
    weights = folder / "distill" / "student.safetensors"
    curve = rec["val"]["curve"]
    best_is_last = bool(curve) and rec["val"].get("best_step") == curve[-1]["step"]
    best_w = None if best_is_last else best_val_student(cfg, folder, rec)
    ident = {"last": file_identity(weights), "best": file_identity(best_w) if best_w else None,
             "best_is_last": best_is_last, "test": [file_identity(p) for p in setup.splits["test"]]}
    try:
        old = json.loads(cache.read_text())
        if old.get("identity") == ident:
            return old["result"]
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    ecfg = _cfg(setup.base, {}, teacher__weights=str(setup.teacher), eval__shards=setup.splits["test"],
                eval__out=str(setup.out / "test_eval"))
    t0 = time.perf_counter()
    last = run_eval(ecfg, weights=str(weights))
    res = {"last": last["top1"], "n": last["n"], "teacher": last.get("teacher_top1"),
           "per_class_last": last.get("per_class"), "at_best_val": last["top1"] if best_is_last else None,
           "best_val_step": rec["val"].get("best_step")}
    if best_w is not None:
        res["at_best_val"] = run_eval(ecfg, weights=str(best_w))["top1"]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(cache, {"identity": ident, "result": res})
    return res


# ----------------------------------------------------------------------------------------- tuning

def tune_row(setup: Setup, qc: QualityConfig, plan: Plan, seed: int) -> dict:
    """Every grid candidate trained once (tuning seed), judged on val; returns the choice and the trials."""
    cands = candidates(plan.grid) if qc.tune.enabled else [{}]
    if len(cands) == 1:
        return {"chosen": as_text(cands[0]), "values": cands[0], "trials": [], "metric": qc.tune.metric}
    trials = []
    for extra in cands:
        # test top-1 is recorded (never consulted here), so the chosen trial is the seed's final run as it
        # stands in the ledger, in a later session too
        r = run_one(setup, plan.row, extra, seed, test=True)
        v = r["val"]["last"] if qc.tune.metric == "val_last" else r["val"]["best"]
        trials.append({"set": as_text(extra), "values": extra, "val": v, "folder": r["folder"]})
        say(f"[{plan.row.name}] tune {' '.join(as_text(extra))}: val {qc.tune.metric} {100 * (v or 0):.2f}%")
    best = max(trials, key=lambda t: -1 if t["val"] is None else t["val"])  # first of the ties
    return {"chosen": best["set"], "values": best["values"], "trials": trials, "metric": qc.tune.metric}


def run_benchmark(qc: QualityConfig, only_rows: Optional[list[str]] = None,
                  on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Everything: returns the raw results (per row: tuning, per-seed runs) for the report.

    `on_row(raw so far)` is called after every finished row (the CLI writes the report then), so a run
    stopped part-way keeps what it finished; a rerun skips every finished stage and continues.
    """
    plans = resolve_rows(qc, only_rows)
    t0 = time.perf_counter()
    setup = prepare(qc)
    tune_seed = qc.tune.seed if qc.tune.seed is not None else qc.seeds[0]
    results = []

    def raw() -> dict:
        return {"setup": setup, "results": list(results), "seconds": round(time.perf_counter() - t0, 1),
                "tune_seed": tune_seed, "rows_planned": [p.row.name for p in plans]}

    by_name = {p.row.name: p for p in plans}
    source_of = {dst: src for src, dsts in qc.tune.share.items() for dst in dsts}
    tunings: dict[str, dict] = {}

    def tuning_of(plan: Plan) -> dict:
        if plan.row.name not in tunings:
            src = source_of.get(plan.row.name)
            if src is not None:  # the family's search, run once (first by the row that needs it)
                t = tuning_of(by_name[src])
                tunings[plan.row.name] = {"chosen": t["chosen"], "values": t["values"], "trials": [],
                                          "metric": t["metric"], "shared_from": src}
            else:
                tunings[plan.row.name] = tune_row(setup, qc, plan, tune_seed)
        return tunings[plan.row.name]

    for plan in plans:
        tuning = tuning_of(plan)
        runs = [run_one(setup, plan.row, tuning["values"], seed, test=True) for seed in (plan.seeds or qc.seeds)]
        results.append({"row": plan.row, "tuning": tuning, "runs": runs})
        if on_row is not None:
            on_row(raw())
    return raw()
