"""The teacher-scoring actor: one frozen teacher per actor, batches of decoded images in, score rows out.

Used as a callable class in Ray Data `map_batches` (an actor pool). Every row that comes in goes out
again — scored, or with its damage reason — so the driver can tell when a shard is complete. With
`decode` given (`score.decode=actor`) the rows arrive as the pool reader's undecoded entries and the actor
decodes them itself on its own threads (Pillow releases the GIL while it decodes and resizes), so no decode
tasks, worker processes or object-store copies of decoded images stand between the reader and the teacher.
"""
from __future__ import annotations

import ctypes
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from ..metrics import ray_metric
from ..models import inference_forward, load_model, normalize
from ..pool.decode import decode_into
from ..tables import score_schema

OUT_EXTRA = [("reason", pa.string()), ("detail", pa.string())]
# The teacher sees batches padded to a multiple of this many rows. Batches arrive with every size from 1
# to score.batch_size (damaged rows left out, each shard's last batch), and CPU torch (oneDNN) keeps
# primitives and scratch memory per input shape, so the actor's memory grew with the number of shards
# scored (figures: docs/BENCHMARKS.md, design notes). BatchNorm is in eval mode: padding rows change nothing.
SHAPE_STEP = 32
# Every TRIM_EVERY batches the actor hands the C heap's free pages back to the OS (glibc malloc_trim): freed
# batch and activation buffers stayed with the allocator, and the actor's own memory crept up with the
# number of shards scored (figures: docs/BENCHMARKS.md, design notes).
TRIM_EVERY = 64


def _malloc_trim():
    """glibc's malloc_trim(0), or a no-op where there is no glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda _pad: 0


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> Optional[torch.Tensor]:
    """Fixed seeded random orthogonal projection (out_dim x in_dim), or None when no projection is needed."""
    if in_dim <= out_dim:
        return None
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_dim, out_dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # q: in_dim x out_dim, orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.contiguous().float()


def output_schema(feature_dim: int) -> pa.Schema:
    s = score_schema(feature_dim)
    for name, typ in OUT_EXTRA:
        s = s.append(pa.field(name, typ))
    return s


@torch.no_grad()
def score_logits_features(logits: torch.Tensor, feats: torch.Tensor, topk: int, proj: Optional[torch.Tensor]) -> dict:
    """METHODS.md §1.1 columns from teacher logits and penultimate features (float32 math)."""
    logits = logits.float()
    c = logits.shape[1]
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    maxprob, pred = p.max(dim=1)
    entropy = -(p * logp).sum(dim=1) / math.log(c) if c > 1 else torch.zeros_like(maxprob)
    energy = -torch.logsumexp(logits, dim=1)
    tv, ti = logits.topk(topk, dim=1)
    f = torch.nn.functional.normalize(feats.float(), dim=1)
    if proj is not None:
        f = torch.nn.functional.normalize(f @ proj.T, dim=1)
    return {
        "pred": pred.int().numpy(),
        "maxprob": maxprob.numpy().astype(np.float32),
        "entropy": entropy.clamp(0, 1).numpy().astype(np.float32),
        "energy": energy.numpy().astype(np.float32),
        "topk_idx": ti.int().numpy(),
        "topk_logit": tv.numpy().astype(np.float32),
        "feature": f.numpy().astype(np.float16),
    }


def projection_from_meta(score_meta: dict) -> Optional[torch.Tensor]:
    """The projection a score table was written with (its metadata's `projection`), or None."""
    pm = score_meta.get("projection")
    return projection_matrix(int(pm["in_dim"]), int(pm["out_dim"]), int(pm["seed"])) if pm else None


@torch.no_grad()
def score_images(model: torch.nn.Module, model_meta: dict, images: np.ndarray, topk: int,
                 proj: Optional[torch.Tensor], batch_rows: int = 256) -> dict:
    """Score uint8 (N,H,W,C) images with a loaded, eval-mode teacher outside Ray (eager float32, in batches
    of `batch_rows`): the score table's columns (`score_logits_features`) for every image, as numpy arrays."""
    parts = []
    for s in range(0, len(images), batch_rows):
        f = model.forward_features(normalize(images[s: s + batch_rows], model_meta))
        parts.append(score_logits_features(model.classify(f), f, topk, proj))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class TeacherScorer:
    """Callable class for `map_batches`: loads the teacher once, scores every batch it is given."""

    def __init__(self, weights: str, device: str, dtype: str, topk: int, feature_dim: int, seed: int, threads: int = 0,
                 inference: str = "jit", streams: Optional[int] = None, decode: Optional[dict] = None):
        self.device = torch.device(device)
        # CPU: `threads` single-threaded forwards side by side (score/config.ScoreConfig.streams), unless told otherwise
        self.streams = 1 if self.device.type != "cpu" else (streams or threads or 1)
        if self.streams > 1 or threads:
            torch.set_num_threads(1 if self.streams > 1 else threads)
        self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="teacher") if self.streams > 1 else None
        self.model, self.meta = load_model(weights, map_location="cpu")
        self.model.eval().to(self.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        size, chans = int(self.meta["input_size"]), int(self.meta.get("in_chans", 3))
        example = normalize(torch.zeros((SHAPE_STEP, size, size, chans), dtype=torch.uint8), self.meta).to(self.device)
        # autocast (bf16/fp16) runs the eager module: a trace would bake one dtype's casts into the graph
        self.forward, self.inference = inference_forward(self.model, example, inference if dtype == "float32" else "eager")
        self.topk = topk
        self.proj = projection_matrix(self.model.feature_dim, feature_dim, seed)
        self.out_dim = min(self.model.feature_dim, feature_dim)
        self.schema = output_schema(self.out_dim)
        self.m_read = ray_metric("odsd_score_images_read_total")
        self.m_scored = ray_metric("odsd_score_images_scored_total")
        self.m_damaged = ray_metric("odsd_score_images_damaged_total")
        self.m_latency = ray_metric("odsd_score_batch_latency_seconds")
        self.trim, self.calls = _malloc_trim(), 0
        self.decode = decode  # {size, channels, max_pixels, reduced}: decode entries here (score.decode=actor)
        self.decode_threads = max(1, threads or 1)
        self.decoder = (ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
                        if decode and self.decode_threads > 1 else None)

    def _decode(self, batch: dict) -> dict:
        """The batch with an `image` column decoded from its `data` and `ext`, damage in `reason`/`detail`;
        the rows are dealt round-robin to the decode threads (large and small images mix in a shard)."""
        n, d = len(batch["key"]), self.decode
        images = np.zeros((n, d["size"], d["size"], d["channels"]), dtype=np.uint8)
        reasons, details = list(batch["reason"]), list(batch["detail"])
        data, ext = batch["data"], batch["ext"]
        args = (d["size"], d["channels"], d["max_pixels"], d["reduced"])
        k = self.decode_threads if self.decoder is not None else 1

        def part(j: int) -> None:
            decode_into(images, data, ext, reasons, details, range(j, n, k), *args)

        if self.decoder is None:
            part(0)
        else:
            list(self.decoder.map(part, range(k)))
        return {**batch, "image": images, "reason": np.asarray(reasons, dtype=object),
                "detail": np.asarray(details, dtype=object)}

    def _forward(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of a batch: in `streams` slices of whole SHAPE_STEP multiples, side by side."""
        step = SHAPE_STEP * max(1, math.ceil(len(images) / SHAPE_STEP / self.streams))
        if self.pool is None or len(images) <= step:
            return self._forward_one(images)
        parts = list(self.pool.map(self._forward_one, [images[i:i + step] for i in range(0, len(images), step)]))
        return torch.cat([z for z, _ in parts]), torch.cat([f for _, f in parts])

    @torch.no_grad()
    def _forward_one(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        m = len(images)
        pad = -m % SHAPE_STEP  # a few batch shapes only (see SHAPE_STEP)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        x = normalize(torch.from_numpy(images), self.meta).to(self.device, non_blocking=True)
        use_amp = self.dtype != torch.float32
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=use_amp):
            z, f = self.forward(x)
        return z[:m].float().cpu(), f[:m].float().cpu()

    def __call__(self, batch: dict) -> pa.Table:
        if self.decode is not None:
            batch = self._decode(batch)
        n = len(batch["key"])
        reason = np.asarray(batch["reason"], dtype=object)
        ok = np.flatnonzero(reason == "")
        k, d = self.topk, self.out_dim
        cols = {
            "pred": np.full(n, -1, np.int32),
            "maxprob": np.zeros(n, np.float32),
            "entropy": np.zeros(n, np.float32),
            "energy": np.zeros(n, np.float32),
            "topk_idx": np.zeros((n, k), np.int32),
            "topk_logit": np.zeros((n, k), np.float32),
            "feature": np.zeros((n, d), np.float16),
        }
        self.m_read.inc(n)
        if len(ok):
            t0 = time.perf_counter()
            z, f = self._forward(batch["image"][ok])
            out = score_logits_features(z, f, k, self.proj)
            self.m_latency.observe(time.perf_counter() - t0)
            for name, v in out.items():
                cols[name][ok] = v
            self.m_scored.inc(len(ok))
        for r in set(reason[reason != ""]):
            self.m_damaged.inc(int((reason == r).sum()), tags={"reason": r})
        self.calls += 1
        if self.calls % TRIM_EVERY == 0:
            self.trim(0)
        arrays = [
            pa.array(batch["key"], pa.string()),
            pa.array(batch["shard"], pa.string()),
            pa.array(batch["url"], pa.string()),
            pa.array(cols["pred"]),
            pa.array(cols["maxprob"]),
            pa.array(cols["entropy"]),
            pa.array(cols["energy"]),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["topk_idx"].ravel()), k).cast(pa.list_(pa.int32())),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["topk_logit"].ravel()), k).cast(pa.list_(pa.float32())),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["feature"].ravel()), d),
            pa.array(reason, pa.string()),
            pa.array(batch["detail"], pa.string()),
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)
