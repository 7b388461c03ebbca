"""The `sample` config section: which method, how many images, every APS knob and the target form.

Every knob has a default; unknown keys are errors (Section forbids extras). The seed is the global
`cfg.seed` so one number fixes every stage.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from ..section import Section, known_name
from .baselines import RANKERS

OWN_METHODS = ("aps", "all")  # the others are the registered baselines (sample/baselines.RANKERS)


def methods() -> tuple[str, ...]:
    return OWN_METHODS[:1] + tuple(RANKERS) + OWN_METHODS[1:]


class APSConfig(Section):
    """METHODS.md §1.2: score = a_c*z(maxprob) + a_r*z(cos to prototype) + a_e*z(-energy)."""

    a_c: float = 1.0  # weight of the standardised confidence (maxprob)
    a_r: float = 1.0  # weight of the standardised closeness to the predicted class's prototype
    a_e: float = 1.0  # weight of the standardised negative energy
    rounds: int = Field(2, ge=1, le=5)  # round 1: prototypes from the pool; round t+1: from round t's selection
    prototypes_per_class: int = Field(1, ge=1, le=64)  # >1: k-means modes per class, from round 2 on
    # Round-1 prototype rows: "all" = every row predicted as the class; "confident" = only rows with
    # maxprob >= confident_threshold (falls back to all rows for a class that has none).
    prototype_source: Literal["all", "confident"] = "all"
    confident_threshold: float = Field(0.5, ge=0, le=1)
    prototype_weight: Literal["maxprob", "uniform"] = "maxprob"  # w(x) in mu_k = normalise(sum w f)
    # Centre the prototypes on the pool's mean feature: mu_k = normalise(sum w (f - f_pool)). Penultimate
    # features share one large common direction, so the uncentred class mean mostly points at it and the
    # cosine ranks "typical pool image" rather than "typical class k" (docs/RESULTS.md, sampling).
    center: bool = True
    kmeans_iters: int = Field(5, ge=1, le=100)
    # The stats pass keeps a fixed sample of about this many rows (picked by a hash of their features; every
    # row when the pool is smaller). The rounds run on it: the pool mean/std of the prototype cosine, each
    # class's top share and the next prototypes; and the select pass's per-class score floors come from it.
    # Driver memory ~ rows x feature_dim x 4 bytes (200k x 64: 51 MB). See aps.py.
    stats_sample_rows: int = Field(200_000, ge=1000)
    # Rows each class's next prototypes come from in every adaptive round, at least (capped by its quota and
    # its pool count). A class whose top share of the sample is smaller (C = 1,000 over a 10^9-row pool: under
    # one row) takes its best rows of the whole pool instead, from one extra select-like pass per round.
    # 0: the sample's rows only. Driver memory ~ C x this x feature_dim x 2 bytes.
    min_rows_per_class: int = Field(32, ge=0)
    # Sample weight of a selected row: 1 (False) or sigmoid(score) rescaled to mean 1 over the selection.
    weight_by_score: bool = False


class TargetConfig(Section):
    """METHODS.md §1.3: sparse low-noise target = softmax of the top-k' logits at temperature tau.

    tau should equal distill's KD temperature (4 by default): L_lnkd compares q_T with
    softmax(z_S / tau), so a target made at another tau is a mismatched distribution. The value used
    is recorded in the selection metadata so distill can check it.
    """

    topk: int = Field(3, ge=1)  # k'
    tau: float = Field(4.0, gt=0)


class SampleConfig(Section):
    method: str = "aps"  # methods(): aps, a registered baseline, or all
    n: int = Field(30_000, ge=1)  # images to select (ignored by `all`)
    aps: APSConfig = Field(default_factory=APSConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    scores: Optional[str] = None  # score dir (default: cfg.stage_dir("score"))
    batch_rows: int = Field(262_144, ge=1024)  # rows per Ray Data batch in the sampling passes
    reshard: Optional[str] = None  # folder: also write the selected images as new training shards
    pool_shards: list[str] = Field(default_factory=list)  # source tars for reshard (default: score.shards)
    out: Optional[str] = None

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return known_name(v, methods(), "sampling method")
