"""The benchmark's own config: a base odsd config (`odsd:`, every stage section) plus what to compare.

Loaded with yaml.safe_load; `--quick` deep-merges the `quick:` section over the rest (lists replace),
then `--set a.b=c` overrides apply (the same syntax as `odsd --set`). Unknown keys are errors.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from odsd_dist.config import build_config, load_raw
from odsd_dist.errors import UserError
from odsd_dist.section import format_validation_error, parse_override, set_path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """The original domain: labelled train / validation / test shards (tar paths, folders or globs)."""

    train: list[str]                       # the original training split (oracle and scratch rows train on it)
    test: list[str]                        # reported once per configuration
    val: list[str] = Field(default_factory=list)  # a validation split; empty: cut `val_size` images from `train`
    val_size: Union[int, float] = Field(0.1, gt=0)  # images (int) or a fraction of `train` (float < 1)
    train_size: Optional[int] = Field(None, ge=1)  # cap on the train-minus-val images (quick runs); None: all
    split_seed: int = 0
    shard_size: int = Field(5000, ge=1, le=10000)  # images per tar of the cut splits


class TeacherSpec(_Section):
    train: bool = False  # true: `odsd teacher train` (odsd.teacher_train; shards default to data.train)


class TuneConfig(_Section):
    """Hyper-parameter search on the validation split (never on test): a grid of config values by dotted key."""

    enabled: bool = True
    seed: Optional[int] = None  # the seed of the tuning runs (default: the first of `seeds`; reused by the final run)
    metric: Literal["val_last", "val_best"] = "val_last"
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # key -> candidate values, for the rows below
    rows: Optional[list[str]] = None  # rows that get `grid` (default: every row); a row's own grid adds to it
    # rows that take another (tuned) row's chosen values instead of a search of their own, e.g.
    # {kd_maxprob: [kd_pool, kd_random]}: one search per family of rows, documented in the report
    share: dict[str, list[str]] = Field(default_factory=dict)


class RowSpec(_Section):
    """A row in the config: a registered name (optionally with extra overrides), or a new row."""

    name: str
    label: Optional[str] = None
    source: Optional[Literal["pool", "train"]] = None  # required for a name that is not registered
    set: dict[str, Any] = Field(default_factory=dict)  # odsd config values by dotted key ({distill.method: kd})
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: Optional[list[int]] = Field(None, min_length=1)  # this row's seeds (default: the config's `seeds`)
    group: Optional[str] = None
    what: Optional[str] = None


    @field_validator("set", mode="before")
    @classmethod
    def _texts(cls, v):
        """`set` may also be written as `--set` texts (["distill.method=kd"]): parsed once, here, to values."""
        if isinstance(v, (list, tuple)):
            try:
                return dict(parse_override(item) for item in v)
            except UserError as e:
                raise ValueError(str(e)) from None
        return v


class QualityConfig(_Section):
    out: str = "runs/quality"
    odsd: dict = Field(default_factory=dict)  # the base odsd config (odsd_dist/config.py) every stage run starts from
    data: DataConfig
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    score_dir: Optional[str] = None  # an existing, finished score dir of this teacher and pool (read only)
    # a folder (committed) of every finished run's record, read before training a run (bench/quality/ledger.py)
    ledger: Optional[str] = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    rows: list[Union[str, RowSpec]] = Field(min_length=1)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    quick: dict = Field(default_factory=dict)  # a partial config merged over this one by --quick
    mode: Literal["full", "quick"] = "full"  # set by the command line
    _left_out: list = PrivateAttr(default_factory=list)  # full-mode rows that --quick leaves out (for the report)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`: dicts merge recursively, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_quality_config(path: str, quick: bool = False, overrides: list[str] = ()) -> QualityConfig:
    raw = load_raw(path)
    full_rows = [r if isinstance(r, str) else (r or {}).get("name") for r in raw.get("rows") or []]
    if quick:
        q = raw.get("quick") or {}
        if not isinstance(q, dict):
            raise UserError(f"config {path}: `quick` must be a mapping")
        raw = deep_merge(raw, q)
        raw["mode"] = "quick"
    for item in overrides or ():
        key, value = parse_override(item)
        set_path(raw, key, value)
    try:
        cfg = QualityConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    kept = {r if isinstance(r, str) else r.name for r in cfg.rows}
    cfg._left_out = [r for r in full_rows if r not in kept] if quick else []
    try:
        build_config(cfg.odsd)  # the base odsd config must be valid on its own: errors name the key
    except UserError as e:
        raise UserError(str(e).replace("config error: ", "config error: odsd.")) from None
    d = cfg.odsd.get("distill") or {}
    if not d.get("steps"):
        raise UserError("odsd.distill.steps: set it; every row trains for the same number of optimizer steps")
    if isinstance(cfg.data.val_size, float) and cfg.data.val_size >= 1:
        raise UserError("data.val_size: a float is a fraction of the train split and must be < 1")
    return cfg

