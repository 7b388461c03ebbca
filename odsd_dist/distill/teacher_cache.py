"""Teacher outputs computed once (`distill.teacher_outputs: cached`), as FKD / ReLabel do for ImageNet KD.

For every training image, K seeded weak views (flip + pad-crop parameters, a function of (seed, row id)
only) are passed once through the frozen teacher on Ray Data actors; the table keeps the training rows
and adds per view the parameters, the teacher's top-k logits and its (projected) features:

  tc_params (K, 3) int8    flip sign, dx, dy          tc_idx (K, k) int16   top-k classes
  tc_val    (K, k) float32 their logits                tc_feat (K, d) float16 features (projected if > d)

Training draws one stored view per image and epoch and rebuilds exactly that view (augment.cached_view),
so the teacher does not run during distillation. The build is resumable: it works in chunks of train_data
files, each written atomically under a name of its own, and a rerun skips the chunks already there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from ..models import load_model
from ..score.scorer import projection_matrix
from ..stage import fingerprint
from ..tables import atomic_write_json
from .augment import normalise, weak_from_params, weak_params
from .data import DONE, data_done

FILES_PER_CHUNK = 8
CACHER_KEYS = ("views", "topk", "feature_dim", "seed", "pad", "flip")  # cache_folder inputs TeacherCacher takes


def view_params(idx: np.ndarray, seed: int, views: int, pad: int, flip: bool) -> np.ndarray:
    """(n, K, 3) int8 weak-view parameters, each row's from its own (seed, row id) stream."""
    out = np.empty((len(idx), views, 3), np.int8)
    for r, i in enumerate(np.asarray(idx, np.int64)):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(i) & 0xFFFFFFFF, int(i) >> 32 & 0xFFFFFFFF, 0x7C])
        out[r] = weak_params(views, rng, pad, flip)
    return out


class TeacherCacher:
    """Callable class for `map_batches` (an actor pool): the teacher once, K views of every row."""

    def __init__(self, weights: str, *, views: int, topk: int, feature_dim: int, seed: int, pad: int, flip: bool,
                 threads: int, device: str = "cpu"):
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.model, self.meta = load_model(weights, map_location=self.device)
        self.model.eval().requires_grad_(False)
        c = int(self.meta["in_chans"])
        self.mean = list(self.meta.get("mean") or [0.0] * c)
        self.std = list(self.meta.get("std") or [1.0] * c)
        self.views, self.seed, self.pad, self.flip = views, seed, pad, flip
        self.topk = min(topk, int(self.meta["num_classes"]))
        self.proj = projection_matrix(self.model.feature_dim, feature_dim, seed)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        image = np.asarray(batch["image"])
        n = len(image)
        params = view_params(np.asarray(batch["idx"]), self.seed, self.views, self.pad, self.flip)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float()
        idx_out, val_out, feat_out = [], [], []
        for v in range(self.views):
            xv = normalise(weak_from_params(x, params[:, v]), self.mean, self.std).to(self.device)
            f = self.model.forward_features(xv)
            z = self.model.classify(f).float()
            val, top = z.topk(self.topk, dim=1)
            f = f.float()
            if self.proj is not None:
                f = f @ self.proj.T.to(f.device)
            idx_out.append(top.to(torch.int16).cpu().numpy())
            val_out.append(val.cpu().numpy())
            feat_out.append(f.to(torch.float16).cpu().numpy())
        out = dict(batch)
        out["tc_params"] = params
        out["tc_idx"] = np.stack(idx_out, 1)
        out["tc_val"] = np.stack(val_out, 1).astype(np.float32)
        out["tc_feat"] = np.stack(feat_out, 1)
        assert out["tc_idx"].shape[:2] == (n, self.views)
        return out


def data_digest(selection: Optional[Path], shard_paths: list[str]) -> str:
    """What the training rows are, by content: the selection's keys, shards, weights and targets (not the
    file's path or time), or the identities of the shards trained on whole. Runs with equal digests (other
    seeds, another row of a benchmark with the same selection) share one cache."""
    h = hashlib.sha256()
    if selection is not None:  # the columns' Arrow IPC bytes: one chunk each, no file metadata (no Python objects)
        t = pq.read_table(selection, columns=["key", "shard", "weight", "target_idx", "target_prob"])
        t = t.combine_chunks().replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        h.update(sink.getvalue())
    for p in shard_paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_folder(root: Path, *, data: str, teacher_sha256: str, views: int, topk: int, feature_dim: int,
                 seed: int, pad: int, flip: bool, size: int) -> tuple[Path, dict]:
    """(the cache's own folder under `root`, named by everything that decides its content; those inputs)."""
    inputs = {"data": data, "teacher_sha256": teacher_sha256, "views": views, "topk": topk,
              "feature_dim": feature_dim, "seed": seed, "pad": pad, "flip": flip, "size": size}
    return Path(root) / fingerprint(inputs)[:16], inputs


def build_teacher_cache(folder: Path, train_dir: Path, inputs: dict, *, weights: str, batch_size: int,
                        actor_cpus: float, threads: int, device: str = "cpu", progress: bool = True) -> dict:
    """Build `folder` (cache_folder) from the materialised `train_dir`, resumable by chunk; returns its record.

    The views, top-k, feature width, seed and weak-view settings are the ones `inputs` (cache_folder) names
    the folder by, so a cache's content always matches its name.

    One build at a time per folder: runs that share a cache run one after another (the benchmark does)."""
    files = sorted(str(p) for p in Path(train_dir).glob("*.parquet"))
    fp = fingerprint(inputs)
    rec = data_done(folder, fp)
    if rec is not None:
        return rec
    marker = folder / "_fingerprint"
    if folder.exists() and (not marker.is_file() or marker.read_text() != fp):
        shutil.rmtree(folder)  # another teacher or other settings: nothing in it can be reused
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp)
    t0 = time.perf_counter()
    chunks = [files[i:i + FILES_PER_CHUNK] for i in range(0, len(files), FILES_PER_CHUNK)]
    todo = [c for c in range(len(chunks)) if not (folder / f"_chunk-{c:05d}.done").is_file()]

    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), unit="chunk", desc="teacher outputs",
               disable=not progress, file=sys.stderr)
    for c in todo:
        for stale in folder.glob(f"chunk-{c:05d}-*.parquet"):  # a chunk cut short by a crash: redo it whole
            stale.unlink()
        ds = ray.data.read_parquet(chunks[c], num_cpus=0.25)
        ds = ds.map_batches(TeacherCacher, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=actor_cpus,
                            num_gpus=1 if device == "cuda" else 0,
                            fn_constructor_kwargs=dict(weights=weights, threads=threads, device=device,
                                                       **{k: inputs[k] for k in CACHER_KEYS}))
        tmp = folder / f".chunk-{c:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds.write_parquet(str(tmp))
        for j, p in enumerate(sorted(tmp.glob("*.parquet"))):
            os.replace(p, folder / f"chunk-{c:05d}-{j:03d}.parquet")
        (folder / f"_chunk-{c:05d}.done").write_text("")  # the chunk counts once all its files are in place
        shutil.rmtree(tmp, ignore_errors=True)
        bar.update(1)
    bar.close()
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("chunk-*.parquet"))
    rec = {"fingerprint": fp, "rows": rows, **{k: inputs[k] for k in ("views", "topk", "feature_dim")},
           "seconds": round(time.perf_counter() - t0, 2), "inputs": inputs}
    atomic_write_json(folder / DONE, rec)
    return rec
