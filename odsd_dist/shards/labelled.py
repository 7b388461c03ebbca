"""Labelled shards (CIFAR-style) to numpy: for teacher training, oracle/scratch baselines and evaluation.

A labelled sample is KEY.jpg|png|webp plus KEY.cls (the label as text) and/or KEY.json with
`label` (and `class_name`). Class names come from `classes.json` beside the shards (or one folder
up, as in cifar10/{train,test}/ + cifar10/classes.json), else from the json members.
Damaged or unlabelled entries are skipped and counted, never fatal.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from .decode import DEFAULT_MAX_PIXELS, Damaged, decode_sample
from .tario import expand_shards, iter_samples

log = logging.getLogger(__name__)


def read_class_names(paths: Sequence[str] | str) -> Optional[list[str]]:
    """classes.json beside the first shard or in its parent folder; None if there is none."""
    tars = expand_shards(paths)
    folder = Path(tars[0]).resolve().parent
    for cand in (folder / "classes.json", folder.parent / "classes.json"):
        if cand.is_file():
            try:
                names = json.loads(cand.read_text())
            except json.JSONDecodeError:
                log.warning("ignoring unreadable %s", cand)
                continue
            if isinstance(names, list):
                return [str(x) for x in names]
    return None


def sample_label(sample: dict) -> tuple[Optional[int], Optional[str]]:
    """(label, class_name) of a sample from KEY.cls, else KEY.json; (None, None) when unlabelled."""
    label, name = None, None
    meta = None
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    if isinstance(meta, dict):
        name = meta.get("class_name") if isinstance(meta.get("class_name"), str) else None
        if isinstance(meta.get("label"), int) and not isinstance(meta.get("label"), bool):
            label = meta["label"]
    if sample.get("cls") is not None:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = None
    return label, name


def _init_stats(stats: Optional[dict]) -> dict:
    stats = {} if stats is None else stats
    for k, v in (("loaded", 0), ("skipped", {}), ("tar_errors", [])):
        stats.setdefault(k, v)
    return stats


def _skip(stats: dict, reason: str) -> None:
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1


def iter_labelled_batches(paths: Sequence[str] | str, size: int, channels: int = 3, batch_size: int = 256,
                          max_pixels: int = DEFAULT_MAX_PIXELS, stats: Optional[dict] = None,
                          num_classes: Optional[int] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (images uint8 (B,size,size,C), labels int64 (B,)) batches; memory is bounded by the batch.

    Skipped entries are counted in `stats["skipped"]` by reason (quarantine reasons, `no_label`,
    `bad_label`); tar read errors are listed in `stats["tar_errors"]` and end that shard only.
    """
    stats = _init_stats(stats)
    imgs = np.empty((batch_size, size, size, channels), dtype=np.uint8)
    labs = np.empty((batch_size,), dtype=np.int64)
    n = 0
    for path in expand_shards(paths):
        for sample in iter_samples(path, errors=stats["tar_errors"]):
            label, _ = sample_label(sample)
            if label is None:
                _skip(stats, "no_label")
                continue
            if label < 0 or (num_classes is not None and label >= num_classes):
                _skip(stats, "bad_label")
                continue
            try:
                imgs[n] = decode_sample(sample, size, channels, max_pixels)
            except Damaged as d:
                _skip(stats, d.reason)
                continue
            labs[n] = label
            n += 1
            stats["loaded"] += 1
            if n == batch_size:
                yield imgs.copy(), labs.copy()
                n = 0
    if n:
        yield imgs[:n].copy(), labs[:n].copy()
    if stats["skipped"] or stats["tar_errors"]:
        log.warning("labelled shards: loaded %d, skipped %s, tar errors %d", stats["loaded"],
                    stats["skipped"], len(stats["tar_errors"]))


def load_labelled(paths: Sequence[str] | str, size: int, channels: int = 3, progress: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS,
                  stats: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """All labelled images in memory: (uint8 (N,size,size,C), int64 (N,), class names or None).

    Meant for training-set sizes (CIFAR: 50,000 x 32x32x3 = 150 MB); use iter_labelled_batches for
    big evaluation sets. Pass a dict as `stats` to get the loaded/skipped counts back.
    """
    tars = expand_shards(paths)
    names = read_class_names(tars)
    stats = _init_stats(stats)

    chunks_x, chunks_y = [], []
    json_names: dict[int, str] = {}
    bar = tqdm(total=len(tars), desc="load labelled", unit="shard", disable=not progress, leave=False)
    for path in tars:
        chunk_x, chunk_y = [], []
        for sample in iter_samples(path, errors=stats["tar_errors"]):
            label, cname = sample_label(sample)
            if label is None:
                _skip(stats, "no_label")
                continue
            if label < 0 or (names is not None and label >= len(names)):
                _skip(stats, "bad_label")
                continue
            try:
                chunk_x.append(decode_sample(sample, size, channels, max_pixels))
            except Damaged as d:
                _skip(stats, d.reason)
                continue
            chunk_y.append(label)
            if cname is not None:
                json_names.setdefault(label, cname)
        if chunk_x:
            chunks_x.append(np.stack(chunk_x))
            chunks_y.append(np.asarray(chunk_y, dtype=np.int64))
        bar.update(1)
    bar.close()
    images = np.concatenate(chunks_x) if chunks_x else np.empty((0, size, size, channels), np.uint8)
    labels = np.concatenate(chunks_y) if chunks_y else np.empty((0,), np.int64)
    stats["loaded"] = len(labels)
    if names is None and json_names and sorted(json_names) == list(range(max(json_names) + 1)):
        names = [json_names[i] for i in range(len(json_names))]
    if stats["skipped"] or stats["tar_errors"]:
        log.warning("labelled shards: loaded %d, skipped %s, tar errors %d", len(labels), stats["skipped"],
                    len(stats["tar_errors"]))
    return images, labels, names
