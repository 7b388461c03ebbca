"""Cutting a validation split out of the original training split (METHODS.md §5: tune on it, never on test).

The cut is class-stratified by label (read from KEY.cls / KEY.json, images are not decoded), seeded,
and written by the project's tar writer (odsd_dist.shards.writer) as new WebDataset tars that copy each
sample's members byte for byte (keys kept), plus classes.json, so every stage reads them like any
labelled shards. Done once: a marker records the inputs and settings, and a rerun with the same ones
reuses the folders.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from odsd_dist.config import expand_paths
from odsd_dist.errors import UserError
from odsd_dist.shards.labelled import read_class_names, sample_label
from odsd_dist.shards.tario import iter_samples
from odsd_dist.shards.writer import ShardWriter
from odsd_dist.stage import file_identity, fingerprint
from odsd_dist.tables import atomic_write_json


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """`total` spread over classes in proportion to `counts` (largest remainder), never above a count."""
    total = min(total, int(counts.sum()))
    exact = counts / counts.sum() * total
    q = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - q), kind="stable")[: total - int(q.sum())]:
        q[i] += 1
    return np.minimum(q, counts)


def _labels(paths: list[str]) -> tuple[list[str], np.ndarray, int]:
    """(keys, labels (-1: none), unlabelled count) of every sample, in tar order."""
    keys, labels = [], []
    for p in paths:
        for s in iter_samples(p, errors=[]):
            lab, _ = sample_label(s)
            keys.append(f"{Path(p).name}/{s['__key__']}")
            labels.append(-1 if lab is None or lab < 0 else int(lab))
    y = np.asarray(labels, np.int64)
    return keys, y, int((y < 0).sum())


def cut_splits(data, folder: Path) -> dict:
    """{"train": [tars], "val": [tars], "test": [tars], ...}: the splits every row uses.

    With `data.val` given, it is used as is and `train` is only capped (`train_size`), if asked;
    otherwise `val_size` images per class proportion are cut from `train` into `<folder>/val` and the
    rest (capped by `train_size`) into `<folder>/train`.
    """
    train = expand_paths(data.train, "data.train")
    test = expand_paths(data.test, "data.test")
    val_given = expand_paths(data.val, "data.val") if data.val else None
    if val_given is not None and not data.train_size:
        return {"train": train, "val": val_given, "test": test, "cut": False}
    settings = {"train": [file_identity(p) for p in train], "val_size": None if val_given else data.val_size,
                "train_size": data.train_size, "seed": data.split_seed, "shard_size": data.shard_size}
    fp = fingerprint(settings)
    marker = folder / "splits.json"
    try:
        rec = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        rec = None
    if rec and rec.get("fingerprint") == fp:
        return {"train": rec["train"], "val": val_given or rec["val"], "test": test, "cut": True, **rec["counts"]}

    t0 = time.perf_counter()
    keys, y, unlabelled = _labels(train)
    want = _choose(keys, y, data, cut_val=val_given is None)
    counts = _write(train, want, folder, data.shard_size, cut_val=val_given is None)
    result = {"train": sorted(str(p) for p in (folder / "train").glob("*.tar"))}
    result["val"] = val_given or sorted(str(p) for p in (folder / "val").glob("*.tar"))
    n_counts = {"train_images": counts["train"], "val_images": counts.get("val"),
                "unlabelled_skipped": unlabelled, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(marker, {"fingerprint": fp, "settings": settings, "train": result["train"],
                               "val": result["val"], "counts": n_counts})
    print(f"quality: cut {n_counts['val_images'] if 'val' in counts else 'no'} validation and "
          f"{n_counts['train_images']} training images from data.train into {folder} "
          f"({n_counts['seconds']:.1f} s)", flush=True)
    return {**result, "test": test, "cut": True, **n_counts}


def _choose(keys: list[str], y: np.ndarray, data, cut_val: bool) -> dict[str, str]:
    """{key: "train" | "val"} of the images to keep: a class-stratified, seeded validation cut (when
    `cut_val`), then the rest capped at `data.train_size`, class-stratified too."""
    labelled = np.flatnonzero(y >= 0)
    if len(labelled) < 2:
        raise UserError(f"data.train: {len(labelled)} labelled images; need at least 2 to cut a validation split")
    c = int(y.max()) + 1
    counts = np.bincount(y[labelled], minlength=c)
    rng = np.random.default_rng(data.split_seed)
    order = {k: rng.permutation(np.flatnonzero(y == k)) for k in range(c)}
    is_val = np.zeros(len(y), bool)
    if cut_val:
        n_val = data.val_size if isinstance(data.val_size, int) else int(round(data.val_size * len(labelled)))
        if not 1 <= n_val < len(labelled):
            raise UserError(f"data.val_size: {n_val} validation images out of {len(labelled)} labelled training images")
        for k, q in enumerate(_quotas(counts, n_val)):
            is_val[order[k][:q]] = True
    rest = np.flatnonzero((y >= 0) & ~is_val)
    keep = np.zeros(len(y), bool)
    if data.train_size and data.train_size < len(rest):
        rest_counts = np.bincount(y[rest], minlength=c)
        for k, q in enumerate(_quotas(rest_counts, data.train_size)):
            keep[[i for i in order[k] if not is_val[i]][:q]] = True
    else:
        keep[rest] = True
    return {keys[i]: ("val" if is_val[i] else "train") for i in range(len(y)) if is_val[i] or keep[i]}


def _write(train: list[str], want: dict[str, str], folder: Path, shard_size: int, cut_val: bool) -> dict[str, int]:
    """Copy the chosen samples into `<folder>/train` (and `/val`), built beside it and swapped in; images per split."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    outs = {"train": ShardWriter(tmp / "train", None, shard_size)}  # members copied, no sidecar
    if cut_val:
        outs["val"] = ShardWriter(tmp / "val", None, shard_size)
    for p in train:
        for s in iter_samples(p, errors=[]):
            split = want.get(f"{Path(p).name}/{s['__key__']}")
            if split is not None:
                outs[split].add_sample(s)
    names = read_class_names(train)
    for split, o in outs.items():
        o.close()
        if names:
            (tmp / split / "classes.json").write_text(json.dumps(names))
    shutil.rmtree(folder / "train", ignore_errors=True)
    shutil.rmtree(folder / "val", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    for split in outs:
        (tmp / split).rename(folder / split)
    shutil.rmtree(tmp, ignore_errors=True)
    return {split: o.samples for split, o in outs.items()}
