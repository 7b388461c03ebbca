"""The rows of the quality benchmark: a registry of named methods, each a set of typed config values.

A row says where its training images come from (`pool`: score -> sample -> selection; `train`: the
original domain's labelled training split, for the oracle and the scratch student) and which sample
and distill settings it uses. Everything else (student, steps, batch size, seeds) is shared by every
row. A new method slots in with one `register(Row(...))` call here, or with an
inline row in the benchmark config (`rows: [{name: kd3, source: pool, set: {distill.method: kd3}}]`), never by
editing the runner.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

# Keys a row may not override: every row trains the same student for the same steps at the same batch size.
FIXED_KEYS = ("distill.steps", "distill.epochs", "distill.batch_size", "distill.workers", "distill.student",
              "distill.source", "distill.shards", "distill.selection", "distill.eval_every_epoch",
              "eval.shards", "sample.n", "sample.scores", "score.shards", "teacher.weights", "seed", "out")

SOURCES = ("pool", "train")


@dataclass(frozen=True)
class Row:
    name: str                      # id used in configs, folders and the JSON
    label: str                     # what the table shows
    source: str                    # "pool" or "train"
    set: dict = field(default_factory=dict, hash=False, compare=False)  # odsd config values by dotted key
    group: str = "custom"          # baseline | odsd | method | ablation | reference | custom
    what: str = ""                 # one line for the report
    grid: dict = field(default_factory=dict, hash=False, compare=False)  # row-specific tuning grid


_REGISTRY: dict[str, Row] = {}


def register(row: Row) -> Row:
    """Make a row available by name (config `rows:`)."""
    if row.source not in SOURCES:
        raise ValueError(f"row {row.name}: source must be one of {SOURCES}")
    _REGISTRY[row.name] = row
    return row


def get_row(name: str) -> Row:
    return _REGISTRY[name]


def known_rows() -> list[str]:
    return list(_REGISTRY)


def fixed_key_violations(keys) -> list[str]:
    """The dotted keys among `keys` that touch a key every row must share."""
    return [key for key in keys if any(key == k or key.startswith(k + ".") for k in FIXED_KEYS)]


def as_text(values: dict) -> list[str]:
    """Typed values as `key=value` texts (YAML flow style), for run ids, run.json and the report."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


# Rows whose method needs a live teacher (kd3, mosaickd) or none at all (ce) say `teacher_outputs=online`,
# so a benchmark config may cache the teacher's outputs for every other row.
# --- the built-in rows (METHODS.md §1, §4; issue 9) --------------------------------------------------
register(Row("kd_pool", "KD, whole pool", "pool", {"sample.method": "all", "distill.method": "kd"}, "baseline",
             "Hinton KD on every intact pool image"))
register(Row("kd_random", "KD, random N", "pool", {"sample.method": "random", "distill.method": "kd"}, "baseline",
             "KD on N pool images drawn uniformly"))
register(Row("kd_balanced_random", "KD, class-balanced random N", "pool",
             {"sample.method": "balanced-random", "distill.method": "kd"}, "baseline",
             "KD on N/C pool images per teacher class, at random (balance without confidence)"))
register(Row("kd_maxprob", "KD, class-balanced maxprob top-N", "pool", {"sample.method": "maxprob", "distill.method": "kd"},
             "baseline", "KD on the N/C most confident pool images per teacher class"))
register(Row("kd_strong", "KD, class-balanced maxprob top-N, ODSD's two strong views", "pool",
             {"sample.method": "maxprob", "distill.method": "kd", "distill.options.kd.strong": True}, "baseline",
             "KD with the student on the same two strong views as ODSD's student (teacher on the weak view): "
             "augmentation strength is not mistaken for the method"))
register(Row("odsd", "ODSD (APS + low-noise KD + DCRD)", "pool", {"sample.method": "aps", "distill.method": "odsd"}, "odsd",
             "the full method"))
register(Row("odsd_maxprob", "ODSD, APS -> maxprob top-N", "pool", {"sample.method": "maxprob", "distill.method": "odsd"},
             "ablation", "ODSD's losses on the maxprob selection: what APS adds"))
register(Row("odsd_full_targets", "ODSD, full-softmax targets", "pool",
             {"sample.method": "aps", "distill.method": "odsd", "distill.options.odsd.targets": "teacher", "distill.options.odsd.target_topk": 100000}, "ablation",
             "the teacher's whole softmax at tau instead of the sparse low-noise target: what denoising adds"))
register(Row("odsd_view_targets", "ODSD, low-noise targets from the teacher's view", "pool",
             {"sample.method": "aps", "distill.method": "odsd", "distill.options.odsd.targets": "teacher"}, "ablation",
             "the same top-3 low-noise target, made from the teacher's output on each step's weak view instead of "
             "the one stored with the selection (the un-augmented image): static vs per-view targets"))
register(Row("odsd_no_lnkd", "ODSD, no L_lnkd", "pool",
             {"sample.method": "aps", "distill.method": "odsd", "distill.options.odsd.use_lnkd": False}, "ablation",
             "the low-noise KD term switched off (only L_self + L_rel reach the student)"))
register(Row("odsd_no_self", "ODSD, no L_self", "pool",
             {"sample.method": "aps", "distill.method": "odsd", "distill.options.odsd.use_self": False}, "ablation",
             "without the student self-contrast"))
register(Row("odsd_no_rel", "ODSD, no L_rel", "pool",
             {"sample.method": "aps", "distill.method": "odsd", "distill.options.odsd.use_rel": False}, "ablation",
             "without the teacher relations"))
register(Row("kd3", "KD^3 (dynamic selection + feature alignment + MixDistribution)", "pool",
             {"sample.method": "maxprob", "distill.method": "kd3", "distill.teacher_outputs": "online"}, "method",
             "KD^3 on the class-balanced maxprob top-N (its own selection is dynamic, per step)"))
register(Row("mosaickd", "MosaicKD (generator + patch discriminator)", "pool",
             {"sample.method": "entropy-high", "distill.method": "mosaickd", "distill.teacher_outputs": "online"}, "method",
             "MosaicKD on the pool's highest-entropy N images, as the authors pick their OOD subset"))
register(Row("oracle_kd", "Oracle: KD on the original train split", "train", {"distill.method": "kd"}, "reference",
             "KD on the teacher's own training images (minus the validation split): upper reference"))
register(Row("scratch", "Scratch: labels on the original train split", "train", {"distill.method": "ce", "distill.teacher_outputs": "online"}, "reference",
             "the student trained from labels alone, same steps"))
