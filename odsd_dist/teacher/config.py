"""The `teacher_train` config section: `odsd teacher train`'s data, architecture, schedule and augmentation."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..section import Section


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
    # --- schedule and augmentation (teacher/__init__.py) ---
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
