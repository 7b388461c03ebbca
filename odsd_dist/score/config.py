"""The `score` config section: the pool shards, the teacher-scoring actors, decoding and the score table's form."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..section import Section


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
    # where images are decoded: `tasks` (Ray Data map_batches tasks between the reader and the actors) or
    # `actor` (inside each scoring actor, on its `threads`; the reader's tasks only read). The same tables.
    decode: Literal["tasks", "actor"] = "tasks"
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
