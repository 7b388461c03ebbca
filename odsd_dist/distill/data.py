"""The distillation data pipeline on Ray Data.

1. `materialise`: once per run, the selected pool images (or every image of `distill.shards`) are read
   from their WebDataset shards, filtered to the selected keys, decoded and resized in map_batches,
   joined with their targets and weights, and written as Parquet into `<distill>/train_data/`
   (temporary folder, renamed, then a done marker: idempotent).
2. `pass_dataset`: per epoch, read_parquet -> seeded block shuffle -> vectorised augmentation in
   map_batches producing the views the method asks for; a pass unions several epochs (own seeds each)
   so the pipeline is not restarted at every epoch.
3. `EpochFeed`: a small actor that `streaming_split`s each pass's dataset into equal shards, one per
   training worker; workers iterate their shard with `iter_torch_batches(drop_last=True)` and a
   seeded local shuffle buffer.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..shards.tario import shard_name
from ..stage import fingerprint
from ..tables import atomic_write_json

DONE = "_done.json"
ROWS_PER_FILE = 1024


def _decode_rows(batch, *, lookup: Optional[dict], size: int, channels: int, max_pixels: int,
                 k: int, with_labels: bool, reduced: bool = True) -> pa.Table:
    """map_batches UDF over the pool reader's rows (score/source.py: key, shard, ext, data, reason, label):
    keep the selected keys, decode + resize, attach idx/weight/targets/label."""
    from ..shards.decode import Damaged, decode_image

    cols_in = {c: batch[c].tolist() for c in ("key", "shard", "ext", "data", "reason")}
    labels_in = batch["label"].tolist() if "label" in batch else [-1] * len(cols_in["key"])
    out_img, idx, w, ti, tp, lab, okeys = [], [], [], [], [], [], []
    for key, shard, ext, data, reason, label in zip(*(cols_in[c] for c in ("key", "shard", "ext", "data", "reason")),
                                                    labels_in):
        if reason:
            continue  # bad key, duplicate or no image: quarantined by `score`, never trained on
        if lookup is not None:
            row = lookup.get((shard, key))
            if row is None:
                continue
        try:
            arr = decode_image(data, ext, size, channels, max_pixels, reduced)
        except Damaged:
            continue  # already quarantined by `score`; a damaged selected row is simply not trained on
        out_img.append(arr)
        okeys.append(key)
        if lookup is not None:
            i, weight, t_idx, t_prob = row
            idx.append(i)
            w.append(weight)
            ti.append(t_idx)
            tp.append(t_prob)
            lab.append(-1)
        else:
            idx.append(zlib.crc32(f"{shard}/{key}".encode()))
            w.append(1.0)
            lab.append(int(label) if with_labels else -1)
    n = len(out_img)
    images = np.stack(out_img) if n else np.zeros((0, size, size, channels), np.uint8)
    from ray.data.extensions import ArrowTensorArray

    cols: dict[str, Any] = {
        "idx": pa.array(np.asarray(idx, np.int64)),
        "key": pa.array(okeys, pa.string()),
        "image": ArrowTensorArray.from_numpy(images),
        "weight": pa.array(np.asarray(w, np.float32)),
        "label": pa.array(np.asarray(lab, np.int64)),
    }
    if lookup is not None:
        cols["tgt_idx"] = ArrowTensorArray.from_numpy(np.asarray(ti, np.int64).reshape(n, k))
        cols["tgt_prob"] = ArrowTensorArray.from_numpy(np.asarray(tp, np.float32).reshape(n, k))
    return pa.table(cols)


def _selection_lookup(selection: Path) -> tuple[dict, int, list[str]]:
    """{(shard, key): (row id, weight, target idx[k], target prob[k])}, k, shards: N-bounded, read once."""
    t = pq.read_table(selection, columns=["key", "shard", "weight", "target_idx", "target_prob"])
    k = max((len(x) for x in t.column("target_idx").to_pylist()), default=1) or 1
    lookup = {}
    for i, (key, shard, w, ti, tp) in enumerate(zip(*(t.column(c).to_pylist() for c in
                                                      ("key", "shard", "weight", "target_idx", "target_prob")))):
        ti = list(ti or [])[:k]
        tp = list(tp or [])[:k]
        pad = k - len(ti)
        lookup[(shard, key)] = (i, 1.0 if w is None else float(w), ti + [0] * pad, tp + [0.0] * pad)
    return lookup, k, sorted({s for s, _ in lookup})


def resolve_pool_shards(wanted: list[str], pool_paths: list[str]) -> list[str]:
    """The tar of each wanted shard name; a missing one is a UserError naming it."""
    by_name = {shard_name(p): p for p in pool_paths}
    missing = [s for s in wanted if s not in by_name]
    if missing:
        raise UserError(f"distill.pool_shards: the selection names shards not found there: {', '.join(missing[:5])}"
                        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    return [by_name[s] for s in wanted]


def data_done(folder: Path, fp: str) -> Optional[dict]:
    try:
        rec = json.loads((folder / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec if rec.get("fingerprint") == fp else None


def materialise(folder: Path, *, selection: Optional[Path], shard_paths: list[str], size: int, channels: int,
                max_pixels: int, decode_batch_size: int, data_cpus: float, with_labels: bool,
                reduced: bool = True) -> dict:
    """Build `folder` (train_data/) once; returns its record {rows, k, has_targets, fingerprint}."""
    import ray

    inputs = {"selection": None if selection is None else _identity(selection),
              "shards": [_identity(p) for p in shard_paths], "size": size, "channels": channels, "reduced": reduced}
    fp = fingerprint(inputs)
    rec = data_done(folder, fp)
    if rec is not None:
        return rec
    t0 = time.perf_counter()
    lookup, k, n_expected = None, 0, None
    if selection is not None:
        lookup, k, _ = _selection_lookup(selection)
        n_expected = len(lookup)
    from ..score.source import make_datasource

    # the pool reader of `odsd score` (content picks the image member, keys checked, a key repeated in a
    # tar does not fail it), with labels for labelled shards
    ds = ray.data.read_datasource(make_datasource(shard_paths, {}, labels=with_labels),
                                  override_num_blocks=len(shard_paths), num_cpus=data_cpus)
    lookup_ref = ray.put(lookup)
    ds = ds.map_batches(_decode_batch_task, batch_format="pandas", batch_size=decode_batch_size, num_cpus=data_cpus,
                        fn_kwargs=dict(lookup_ref=lookup_ref, size=size, channels=channels,
                                       max_pixels=max_pixels, k=k, with_labels=with_labels, reduced=reduced))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    ds.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))
    os.replace(tmp, folder)
    rec = {"fingerprint": fp, "rows": rows, "k": k, "has_targets": selection is not None,
           "expected": n_expected, "seconds": round(time.perf_counter() - t0, 2), "inputs": inputs}
    atomic_write_json(folder / DONE, rec)
    return rec


def _decode_batch_task(batch, *, lookup_ref, **kw) -> pa.Table:
    import ray

    lookup = _LOOKUP_CACHE.get(lookup_ref.hex()) if lookup_ref is not None else None
    if lookup is None:
        lookup = ray.get(lookup_ref)
        _LOOKUP_CACHE.clear()
        _LOOKUP_CACHE[lookup_ref.hex()] = lookup
    return _decode_rows(batch, lookup=lookup, **kw)


_LOOKUP_CACHE: dict = {}


def _identity(p) -> dict:
    st = os.stat(p)
    return {"path": os.path.abspath(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _epoch_part(spec: dict, epoch: int, start_step: int, steps: int):
    """Rows for `steps` steps of `epoch` (all workers), starting at `start_step`, augmented with epoch-specific seeds."""
    import ray

    from .augment import augment_batch
    from .config import AugmentConfig

    seed = (spec["seed"], epoch, start_step)
    ds = ray.data.read_parquet(spec["train_dir"], num_cpus=spec["data_cpus"])
    ds = ds.randomize_block_order(seed=int(fingerprint(list(seed))[:8], 16))
    ds = ds.limit(steps * spec["batch_size"] * spec["workers"])  # whole steps only; the remainder varies by seed
    aug = AugmentConfig.model_validate(spec["augment"])
    return ds.map_batches(augment_batch, batch_format="numpy", batch_size=spec["aug_batch_rows"],
                          num_cpus=spec["data_cpus"],
                          fn_kwargs=dict(views=spec["views"], aug=aug, mean=spec["mean"], std=spec["std"], seed=seed))


def pass_dataset(spec: dict, start_step: int):
    """(dataset, end step) of one pass: the rest of the current epoch and up to `epochs_per_pass` more.

    Each epoch in the pass has its own seeded block order and augmentation seed (a union of per-epoch
    parts), so a pass streams several epochs without restarting the pipeline, and a resume mid-epoch
    (`start_step` inside an epoch) takes only the rows its remaining steps need, with a fresh seed.
    """
    spe, total = spec["steps_per_epoch"], spec["total_steps"]
    end = min(total, (start_step // spe + spec["epochs_per_pass"]) * spe)
    parts, s = [], start_step
    while s < end:
        e = s // spe
        stop = min(end, (e + 1) * spe)
        parts.append(_epoch_part(spec, e, s, stop - s))
        s = stop
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds, end


class EpochFeedImpl:
    """Hands each training worker its equal `streaming_split` shard of a pass's dataset.

    Workers ask with (start_step, rank): all ranks of a worker group ask for the same start step, so
    the split is made once per pass; a rank asking twice for one start step means a restarted worker
    group: a fresh split.
    """

    def __init__(self, spec: dict):
        import ray.data

        from ..raytools import use_parquet_v1

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar per pass per worker is noise
        use_parquet_v1(ctx)  # this actor's own process: every pass it plans reads the train data with V1
        self.spec = spec
        self.key = None
        self.end = 0
        self.splits: list = []
        self.served: set[int] = set()

    def split(self, start_step: int, rank: int):
        """(this rank's DataIterator, the step at which the pass ends)."""
        if start_step != self.key or rank in self.served:
            ds, self.end = pass_dataset(self.spec, start_step)
            self.splits = ds.streaming_split(self.spec["workers"], equal=True)
            self.key, self.served = start_step, set()
        self.served.add(rank)
        return self.splits[rank], self.end


def epoch_feed(spec: dict):
    """The EpochFeed actor (no CPU reserved: it only plans; Ray Data tasks do the work)."""
    import ray

    return ray.remote(num_cpus=0)(EpochFeedImpl).remote(spec)
