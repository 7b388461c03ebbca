"""Typed configuration: one pydantic model per stage, loaded from YAML with safe_load.

Every section rejects unknown keys, so a typo is an error that names the key. `--set a.b=c` overrides
are applied before validation. Each stage's section lives beside the stage (`<stage>/config.py`) and owns
its defaults; this module only assembles them. `Config.stage_dir(stage)` says where each stage writes.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError

from .distill.config import DistillConfig
from .errors import UserError
from .evaluate.config import EvalConfig
from .paths import expand_paths  # noqa: F401  (re-exported for bench/ and tests)
from .raytools import RayConfig
from .sample.config import SampleConfig
from .score.config import ScoreConfig
from .section import Section, format_validation_error, parse_override, set_path
from .tables import atomic_write_bytes
from .teacher.config import TeacherTrainConfig


class TeacherConfig(Section):
    weights: str = "runs/teacher/teacher.safetensors"  # safetensors file made by `odsd teacher train`


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
        set_path(data, key, copy.deepcopy(value))
    for item in overrides or ():
        key, value = parse_override(item)
        set_path(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Load YAML (safe_load), apply `--set` overrides, validate. Raises UserError naming the key."""
    return build_config(load_raw(path), overrides)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (all defaults filled in) as YAML, atomically."""
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
