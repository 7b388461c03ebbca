"""`odsd score`: stream pool shards through teacher-scoring actors on Ray Data (METHODS.md §1.1).

duplicate-key pass (pool/dupes.py) -> pool reader (pool/source.py: keys checked, image member
picked, bytes only) -> decode/resize in CPU tasks -> teacher actor pool -> per-shard Parquet (scores +
quarantine) written atomically with a ledger, so reruns skip finished shards.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import ray
import ray.data

from ..console import progress, say
from ..errors import UserError
from ..metrics import prom_metric, serve_metrics
from ..models import build_model, read_model_meta
from ..paths import expand_paths
from ..raytools import threads_for
from ..runner import Plan, Result, Stage, run_configured, run_stage
from ..shards.tario import shard_name
from ..stage import StageOutput, file_identity, fingerprint, sha256_file
from ..tables import Ledger
from ..pool.decode import decode_rows
from ..pool.dupes import load_or_find, per_shard, shard_digest
from .scorer import TeacherScorer
from ..pool.source import make_datasource
from .writer import ShardAssembler

if TYPE_CHECKING:  # the top-level Config assembles this stage's section: a runtime import would loop
    from ..config import Config

# CPUs per task of the duplicate-key pass. It runs before any scoring, with the node to itself; a task of
# score.decode_cpus (0.25-0.5) let Ray start a worker process per concurrent task (up to 8 on 2 cores, each
# importing Ray and the pool reader) that the scoring pipeline then never needed.
DUPES_CPUS = 1.0
TABLE_KEYS = ("topk", "feature_dim", "max_pixels", "dtype", "reduced_decode")  # config keys that change table contents


def _teacher_info(weights: str) -> dict:
    if not Path(weights).is_file():
        raise UserError(f"teacher.weights: file not found: {weights}")
    meta = read_model_meta(weights)
    model = build_model(meta["arch"], num_classes=int(meta["num_classes"]), in_chans=int(meta.get("in_chans", 3)))
    return {"meta": meta, "feature_dim": int(model.feature_dim), "sha256": sha256_file(weights)}


def configured_shards(cfg: Config) -> tuple[list[str]]:
    """The pool shards `score.shards` names (a stage run on its own)."""
    return (expand_paths(cfg.score.shards, "score.shards"),)


def plan(cfg: Config, shards: list[str]) -> Plan:
    """Validate the shards and the teacher before any Ray work; the Plan's work is what the run needs."""
    sc = cfg.score
    names: dict[str, str] = {}
    for p in shards:
        stem = Path(p).stem
        if stem in names:
            raise UserError(f"score.shards: two input shards share the name {stem!r}: {names[stem]} and {p}")
        names[stem] = p
    _check_cpu_budget(cfg)
    teacher = _teacher_info(cfg.teacher.weights)
    c = int(teacher["meta"]["num_classes"])
    topk = min(c, sc.topk or 10)
    identities = {name: file_identity(path) for name, path in names.items()}
    table_cfg = {k: getattr(sc, k) for k in TABLE_KEYS}
    return Plan(cfg.stage_dir("score"), table_cfg, {"teacher_sha256": teacher["sha256"], "shards": identities},
                {"shards": names, "teacher": teacher, "topk": topk, "identities": identities,
                 "out_dim": min(teacher["feature_dim"], sc.feature_dim)})


def _check_cpu_budget(cfg: Config) -> None:
    """On a local Ray, the actor pool's CPUs plus one read+decode task must fit: otherwise no decode task
    can ever be scheduled beside the actors and the run waits forever."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster: other nodes may have the CPUs
    sc = cfg.score
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    need = sc.actors * sc.actor_cpus + sc.decode_cpus
    if need > cpus + 1e-9:
        raise UserError(f"score.actor_cpus / score.decode_cpus: {sc.actors} actor(s) x {sc.actor_cpus} CPU + "
                        f"{sc.decode_cpus} CPU for decoding = {need:g} CPUs, but the local Ray has {cpus} "
                        "(ray.num_cpus): no decode task could run beside the scoring actors")
    if need < cpus - 0.5:
        say(f"odsd score: warning: {sc.actors} actor(s) x score.actor_cpus {sc.actor_cpus} + score.decode_cpus "
            f"{sc.decode_cpus} = {need:g} of the local Ray's {cpus} CPUs; raise score.actors or score.actor_cpus "
            "to use the rest")


def _summary_line(label: str, value) -> str:
    return f"  {label:<22} {value}"


def print_summary(s: dict) -> None:
    lines = ["odsd score — summary", _summary_line("output", s["out"]),
             _summary_line("shards", f"{s['shards']} ({s['shards_scored_now']} scored now, {s['shards_skipped']} already done)"),
             _summary_line("score rows", f"{s['rows']:,}"),
             _summary_line("quarantined", f"{s['quarantined']:,} " + (str(s["reasons"]) if s["reasons"] else "")),
             _summary_line("duplicate keys", f"{s['duplicate_keys']:,} entries (first occurrence kept)"),
             _summary_line("wall time", f"{s['seconds']:.1f} s ({s['images_per_s']:.0f} images/s this run)")]
    print("\n".join(lines), file=sys.stderr)
    if s["quarantined"]:
        say(f"odsd score: warning: {s['quarantined']:,} of {s['rows'] + s['quarantined']:,} pool entries "
            f"quarantined (reasons above), listed in {Path(s['out']) / 'quarantine'}")


def _run(cfg: Config, plan: Plan, stage: StageOutput) -> dict:
    """Score every pool shard not yet in the ledger; the summary once all are finished."""
    p = plan.work
    folder, teacher, identities = plan.folder, p["teacher"], p["identities"]
    ledger = Ledger(folder / "ledger", fingerprint({"table": plan.config, "teacher": teacher["sha256"], "seed": cfg.seed}))

    t_dupes = time.perf_counter()
    dupes = _duplicates(cfg, p, folder, identities)
    t_dupes = time.perf_counter() - t_dupes
    digests = {name: shard_digest(dupes.get(name)) for name in p["shards"]}

    def finished(name: str) -> bool:
        rec = ledger.get(name)
        return (bool(rec) and rec.get("input") == identities[name] and rec.get("dupes") == digests[name]
                and all((folder / sub / f"{name}.parquet").is_file() for sub in ("scores", "quarantine")))

    todo = [name for name in p["shards"] if not finished(name)]
    if 0 < len(todo) < len(p["shards"]):
        say(f"odsd score: resuming: {len(p['shards']) - len(todo)} of {len(p['shards'])} shards already scored")
    for name in todo:  # never leave a stale table of an unfinished shard behind, nor its ledger record
        ledger.drop(name)
        for sub in ("scores", "quarantine"):
            (folder / sub / f"{name}.parquet").unlink(missing_ok=True)
    for sub in ("scores", "quarantine"):  # nor the temporary file of a write a kill -9 cut short
        for tmp in (folder / sub).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    scored_rows, pipeline_seconds, steady = 0, 0.0, None
    if todo:
        scored_rows, pipeline_seconds, steady = _score_shards(cfg, p, [p["shards"][n] for n in todo], folder, ledger,
                                                      identities, dupes, digests)
    seconds = time.perf_counter() - t0
    rows = quarantined = 0
    reasons: dict[str, int] = {}
    for name in p["shards"]:
        r = ledger.get(name)
        if not r or r.get("input") != identities[name] or r.get("dupes") != digests[name]:
            raise RuntimeError(f"shard {name} did not finish; rerun `odsd score` to resume")
        rows += r["rows"]
        quarantined += r["quarantined"]
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    summary = {
        "out": str(folder), "shards": len(p["shards"]), "shards_scored_now": len(todo),
        "shards_skipped": len(p["shards"]) - len(todo), "rows": rows, "quarantined": quarantined,
        "reasons": dict(sorted(reasons.items())), "duplicate_keys": sum(len(v) for v in dupes.values()),
        "seconds": seconds,
        "images_per_s": scored_rows / seconds if seconds > 0 and scored_rows else 0.0,
        "pipeline_seconds": pipeline_seconds,  # without starting Ray
        "steady_images_per_s": steady,  # first shard's finish to the last one's (steady_rate)
        "duplicate_pass_seconds": t_dupes,  # Ray already up (the runner starts it)
        "teacher_sha256": teacher["sha256"], "feature_dim": p["out_dim"],
        "score_files": [f"scores/{n}.parquet" for n in p["shards"]],
        "quarantine_files": [f"quarantine/{n}.parquet" for n in p["shards"]],
    }
    return summary


def _duplicates(cfg: Config, p: dict, folder: Path, identities: dict) -> dict[str, dict[int, str]]:
    """{shard: {ordinal: detail}} of the pool's duplicate entries (first occurrence in pool order wins),
    computed once per set of inputs by Ray tasks and kept in <score>/duplicates.parquet."""
    names = list(p["shards"])
    table = load_or_find(folder / "duplicates.parquet", names, [p["shards"][n] for n in names], identities,
                         DUPES_CPUS)
    prom_metric("odsd_score_duplicate_keys").set(table.num_rows)
    return per_shard(table)


def _score_shards(cfg: Config, p: dict, paths: list[str], folder: Path, ledger: Ledger, identities: dict,
                  dupes: dict, digests: dict) -> tuple[int, float, Optional[float]]:
    """Run the Ray Data pipeline over `paths` and write each shard as it completes.

    Returns (entries read, seconds from the pipeline's start, i.e. without starting Ray, steady rate)."""
    sc = cfg.score
    meta = p["teacher"]["meta"]
    size, channels = int(meta["input_size"]), int(meta.get("in_chans", 3))
    serve_metrics(cfg.metrics.port)
    dupe_refs = {s: ray.put(v) for s, v in dupes.items() if s in {shard_name(x) for x in paths}}
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard i is complete when shard i+1 starts
    ctx.max_errored_blocks = sc.max_errored_blocks
    ctx.target_max_block_size = int(sc.block_mb * 2**20)
    ds = ray.data.read_datasource(make_datasource(paths, dupe_refs), override_num_blocks=len(paths),
                                  num_cpus=sc.decode_cpus)
    decode = {"size": size, "channels": channels, "max_pixels": sc.max_pixels, "reduced": sc.reduced_decode}
    if sc.decode == "tasks":
        ds = ds.map_batches(decode_rows, batch_format="pandas", batch_size=sc.decode_batch_size, fn_kwargs=decode,
                            num_cpus=sc.decode_cpus)
    ds = ds.map_batches(
        TeacherScorer, batch_format="numpy", batch_size=sc.batch_size, compute=ray.data.ActorPoolStrategy(size=sc.actors),
        num_cpus=sc.actor_cpus, num_gpus=sc.num_gpus or None,
        fn_constructor_kwargs={"weights": os.path.abspath(cfg.teacher.weights), "device": sc.device, "dtype": sc.dtype,
                               "inference": sc.inference,
                               "topk": p["topk"], "feature_dim": sc.feature_dim, "seed": cfg.seed,
                               "threads": threads_for(sc.threads, sc.actor_cpus), "streams": sc.streams,
                               "decode": decode if sc.decode == "actor" else None},
    )
    projection = None
    if p["teacher"]["feature_dim"] > sc.feature_dim:
        projection = {"kind": "random_orthogonal", "seed": cfg.seed, "in_dim": p["teacher"]["feature_dim"], "out_dim": sc.feature_dim}
    table_meta = {
        "stage": "score", "config": cfg.score.model_dump(mode="json"), "teacher_sha256": p["teacher"]["sha256"],
        "teacher_arch": meta["arch"], "num_classes": int(meta["num_classes"]), "class_names": meta.get("class_names"),
        "feature_dim": p["out_dim"], "topk": p["topk"], "projection": projection, "seed": cfg.seed,
    }
    bar = progress(total=len(paths), desc="odsd score", unit="shard")
    shards_done = prom_metric("odsd_score_shards_done_total")
    finishes: list[tuple[float, int]] = []  # (time, entries) of each shard as it finishes

    def on_done(name: str, info: dict) -> None:
        finishes.append((time.perf_counter(), info["rows"] + info["quarantined"]))
        bar.update(1)
        bar.set_postfix(rows=info["rows"], damaged=info["quarantined"])
        shards_done.inc()

    asm = ShardAssembler(folder, ledger, p["out_dim"], table_meta, identities, on_done, digests)
    n = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            n += batch.num_rows
            asm.add(batch)
        asm.close()
    finally:
        bar.close()
    return n, time.perf_counter() - t0, steady_rate(finishes)


def steady_rate(finishes: list[tuple[float, int]]) -> Optional[float]:
    """Entries per second from the first shard's finish to the last one's: the rate without the pipeline's
    start (actors loading and tracing the teacher, the first blocks in flight), what a long crawl sees.
    None with fewer than two shards."""
    if len(finishes) < 2 or finishes[-1][0] <= finishes[0][0]:
        return None
    return sum(e for _, e in finishes[1:]) / (finishes[-1][0] - finishes[0][0])


def _reuse(plan: Plan, rec: dict) -> dict:
    return {**rec["summary"], "shards_scored_now": 0, "shards_skipped": len(plan.inputs["shards"])}


STAGE = Stage("score", "score", inputs=configured_shards, plan=plan, run=_run, output=lambda plan, s: plan.folder,
              print_summary=print_summary, needs_ray=True, reuse=_reuse)


def score(shards: list[str], cfg: Config) -> Result:
    """Pool shards -> the score folder (`Result.output`: scores/, quarantine/, ledger/, done.json)."""
    return run_stage(STAGE, cfg, shards)


def run_score(cfg: Config) -> dict:
    """`odsd score`: the shards `score.shards` names; the summary."""
    return run_configured(STAGE, cfg)
