"""The `distill` config section: student, method and its options, data source, Ray Train + DeepSpeed knobs.

Compare methods at the same `steps` and `batch_size` (METHODS.md §5): `steps` counts optimizer steps
over all workers; epochs follow from the training-set size when `steps` is set, else `epochs` is used.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

from ..section import Section, known_name
from .methods import registry


def _options_model() -> type[Section]:
    """`distill.options`: one section per registered method, `distill.options.<method>.<key>`, each the
    method's own `Options` model, so a bad key or value is an error naming it at config load."""
    fields = {name: (cls.Options, Field(default_factory=cls.Options)) for name, cls in sorted(registry().items())}
    return create_model("MethodOptions", __base__=Section, **fields)


MethodOptions = _options_model()


class AugmentConfig(Section):
    """Vectorised augmentation in the Ray Data pipeline (distill/augment.py)."""

    crop_scale_min: float = Field(0.35, gt=0, le=1)  # random-resized crop area range [min, 1]
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    weak_pad: int = Field(4, ge=0)  # the weak view (teacher; `kd`/`ce` student): flip + pad-crop
    # rows are shuffled within windows of whole train_data row groups of >= this many rows (0: row groups
    # in a seeded order, rows in file order); one data task holds a window (distill/data.epoch_order)
    shuffle_buffer: int = Field(1024, ge=0)


class TeacherCacheConfig(Section):
    """distill.teacher_outputs=cached: the teacher's outputs on K seeded weak views of every training image,
    computed once on Ray Data actors (distill/teacher_cache.py)."""

    views: int = Field(8, ge=1)  # K stored weak views per image; training draws one per image and epoch
    topk: int = Field(10, ge=1)  # logits kept per view (the rest count as -inf); min(C, topk)
    feature_dim: int = Field(256, ge=1)  # teacher features above this width get a fixed random projection
    batch_size: int = Field(256, ge=1)
    actor_cpus: float = Field(1.0, gt=0)
    threads: Optional[int] = Field(None, ge=1)  # torch threads of the actor (default: actor_cpus rounded up)
    seed: int = 0  # seeds the K views of every image (the run's seed picks one per epoch)
    # where caches live, one folder per content (data, teacher, settings): runs with the same training rows
    # and teacher share one (default: <distill out>/teacher_cache)
    dir: Optional[str] = None


class DistillConfig(Section):
    student: str = "resnet8"  # models.build_model arch
    method: str = "odsd"  # registry name (distill/methods): odsd, kd, kd3, mosaickd, ce
    options: MethodOptions = Field(default_factory=MethodOptions)
    # online: the teacher runs at every step; cached: its outputs on K stored weak views, computed once
    # (methods that need a live teacher, kd3 and mosaickd, refuse `cached`)
    teacher_outputs: Literal["online", "cached"] = "online"
    cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    source: Literal["selection", "shards"] = "selection"  # the sample stage's selection, or `shards` below
    shards: list[str] = Field(default_factory=list)  # source=shards: labelled or unlabelled tars (all keys)
    selection: Optional[str] = None  # selection.parquet (default: <sample dir>/selection.parquet)
    pool_shards: list[str] = Field(default_factory=list)  # the selection's tars (default: score.shards)
    # Ray Train + DeepSpeed
    workers: int = Field(2, ge=1)
    # Logical CPUs reserved per training worker; workers * worker_cpus + data_cpus must fit the cluster
    # (the defaults fit a 2-CPU laptop: 2 x 0.5 + Ray Data tasks of 0.25).
    worker_cpus: float = Field(0.5, gt=0)
    threads: Optional[int] = Field(None, ge=1)  # torch threads per worker (default: worker_cpus rounded up)
    data_cpus: float = Field(0.25, gt=0)  # CPUs per Ray Data decode/augment task
    zero_stage: int = Field(2, ge=0, le=3)
    dtype: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = True  # images in channels-last layout (docs/BENCHMARKS.md, "Training")
    device: Literal["cpu", "cuda"] = "cpu"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)  # peak learning rate (global batch = workers * batch_size)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up, then cosine to 0
    grad_clip: float = Field(0.0, ge=0)  # 0: off
    batch_size: int = Field(64, ge=2)  # per worker
    steps: Optional[int] = Field(None, ge=1)  # total optimizer steps (takes precedence over epochs)
    epochs: int = Field(10, ge=1)
    # where each worker's batches are read and augmented: `local` (a thread in the training process) or
    # `ray_data` (a Ray Data pipeline per worker, data_cpus per task); the same batches either way
    feed: Literal["local", "ray_data"] = "local"
    epochs_per_pass: int = Field(8, ge=1)  # epochs streamed by one data pipeline before it is rebuilt
    checkpoint_every: int = Field(200, ge=1)  # steps; an epoch end also checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1)  # worker-group restarts from the latest checkpoint (-1: unlimited)
    eval_every_epoch: bool = True  # top-1 on eval.shards after every epoch (needs eval.shards)
    eval_batch_size: int = Field(256, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    decode_batch_size: int = Field(256, ge=1)  # rows per decode task when building train_data/
    log_every: int = Field(20, ge=1)
    out: Optional[str] = None

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return known_name(v, sorted(registry()), "method")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("backend nccl needs device cuda")
        return self

    def resolved_backend(self) -> str:
        """gloo on CPU, nccl on CUDA unless set."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.device == "cuda" else "gloo"


# Keys that change how a run is executed but not what it computes: left out of the stage fingerprint
# so a rerun with, e.g., more allowed failures resumes the same run.
RUNTIME_KEYS = ("channels_last", "feed", "max_failures", "log_every", "keep_checkpoints", "data_cpus", "worker_cpus", "threads",
                "eval_batch_size", "decode_batch_size")
