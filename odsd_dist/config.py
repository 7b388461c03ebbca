"""Typed configuration: one pydantic model per stage, loaded from YAML with safe_load.

Every section rejects unknown keys, so a typo is an error that names the key. `--set a.b=c` overrides
are applied before validation. Stage sections own their defaults; `Config.stage_dir(stage)` says where
each stage writes.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError

from .distill.config import DistillConfig
from .errors import UserError
from .paths import expand_paths  # noqa: F401  (re-exported: stages import it from here)
from .raytools import RayConfig
from .sample.config import SampleConfig
from .section import Section


class TeacherConfig(Section):
    weights: str = "runs/teacher/teacher.safetensors"  # safetensors file made by `odsd teacher train`


class TeacherTrainConfig(Section):
    shards: list[str] = Field(default_factory=list)  # labelled shards (tar paths or globs)
    val_shards: list[str] = Field(default_factory=list)  # optional: accuracy printed after every epoch
    arch: str = "resnet20"
    input_size: int = Field(32, ge=8)
    channels: Literal[1, 3] = 3
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    threads: Optional[int] = Field(None, ge=1)
    out: Optional[str] = None  # default: <dir of teacher.weights>
    # --- schedule and augmentation (teacher.py) ---
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    schedule: Literal["onecycle", "cosine"] = "onecycle"  # onecycle: warm up from lr/25; cosine: from 0
    warmup_frac: float = Field(0.15, ge=0, lt=1)  # fraction of all steps spent warming up
    augment: Literal["crop_flip", "crop", "flip", "none"] = "crop_flip"  # vectorised on uint8 batches
    crop_padding: int = Field(4, ge=0)
    mean: Optional[list[float]] = None  # default: per-channel mean of the training images
    std: Optional[list[float]] = None  # default: per-channel std of the training images
    channels_last: bool = True
    eval_batch_size: int = Field(512, ge=1)
    val_every: int = Field(1, ge=1)  # epochs between val accuracy reports (the last epoch always)
    max_train_samples: Optional[int] = Field(None, ge=1)  # a seeded subset, for quick trials
    # Start from these weights (same arch and classes) instead of a random init: fine-tuning or a
    # warm restart of a finished teacher. Its normalisation is kept unless mean/std are set.
    init: Optional[str] = None
    resume: bool = True  # continue from <out>/teacher_checkpoint.safetensors if its config matches
    progress: bool = True


class ScoreConfig(Section):
    shards: list[str] = Field(default_factory=list)  # pool shards (tar paths or globs)
    batch_size: int = Field(256, ge=1)  # teacher batch
    decode_batch_size: int = Field(256, ge=1)
    actors: int = Field(1, ge=1)  # teacher-scoring actor pool size
    actor_cpus: float = Field(1.0, gt=0)
    # torch threads per scoring actor (default: actor_cpus rounded up). Ray's CPU count is a reservation,
    # not a limit: on a 2-core node actor_cpus=1.5 + decode_cpus=0.5 runs a 2-thread teacher beside decoding.
    threads: Optional[int] = Field(None, ge=1)
    # CPU: the actor's threads run the teacher as this many independent single-threaded forwards, each on a
    # slice of the batch (default: one per thread; 1 = one forward on `threads` OpenMP threads). Independent
    # streams never wait for each other at an OpenMP barrier when decoding takes a core away for a moment:
    # 1.2-1.3x the 2-thread forward on the 2-core reference machine (docs/BENCHMARKS.md). GPU: always 1.
    streams: Optional[int] = Field(None, ge=1)
    decode_cpus: float = Field(0.5, gt=0)  # read+decode tasks; differs from actor_cpus so Ray does not fuse them into the actor
    block_mb: float = Field(1.0, gt=0)  # Ray Data block size target: small blocks keep decode and scoring pipelined
    num_gpus: float = Field(0.0, ge=0)  # per actor
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "jit": the teacher frozen with TorchScript (BN folded, oneDNN layout; models/inference.py), float32
    # only, eager otherwise or when tracing fails. Same results to float32 rounding, so not a TABLE_KEY.
    inference: Literal["jit", "eager"] = "jit"
    topk: Optional[int] = Field(None, ge=1)  # default min(C, 10)
    feature_dim: int = Field(256, ge=1)  # project features above this dimension
    max_pixels: int = Field(50_000_000, ge=1)  # header-declared pixels above this are a decompression bomb
    # Decode a JPEG at the smallest 1/2, 1/4, 1/8 DCT scale still >= the teacher's input (then a filtered
    # resize): a web-size JPEG costs a fraction of a full decode (docs/BENCHMARKS.md). false: always full size.
    reduced_decode: bool = True
    max_errored_blocks: int = Field(0, ge=-1)
    out: Optional[str] = None


class EvalConfig(Section):
    shards: list[str] = Field(default_factory=list)  # labelled original-domain shards (test split)
    batch_size: int = Field(256, ge=1)
    out: Optional[str] = None


class MetricsConfig(Section):
    port: Optional[int] = Field(None, ge=0, le=65535)  # prometheus_client HTTP port in plain processes


class Config(Section):
    seed: int = 0
    out: str = "runs/default"
    ray: RayConfig = Field(default_factory=RayConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teacher_train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage: its section's `out`, else <out>/<stage>."""
        section = getattr(self, stage, None)
        override = getattr(section, "out", None) if section is not None else None
        return Path(override) if override else Path(self.out) / stage

    def section_dict(self, stage: str) -> dict:
        return getattr(self, stage).model_dump(mode="json")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml-typed c)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: value is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"config error: {loc or '<root>'}: {e['msg']}")
    return "\n".join(lines)


def load_raw(path: Optional[str | os.PathLike]) -> dict:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping")
    return data


def build_config(data: dict, overrides: list[str] = (), values: Optional[dict[str, Any]] = None) -> Config:
    """`data` with typed `values` ({"distill.lr": 0.1, ...}: code's own settings, never parsed), then the
    `--set` text `overrides` (a user's), validated."""
    data = copy.deepcopy(data)
    for key, value in (values or {}).items():
        _set_path(data, key, copy.deepcopy(value))
    for item in overrides or ():
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Load YAML (safe_load), apply `--set` overrides, validate. Raises UserError naming the key."""
    return build_config(load_raw(path), overrides)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (all defaults filled in) as YAML, atomically."""
    from .tables import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
