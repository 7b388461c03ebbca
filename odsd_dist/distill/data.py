"""The distillation data pipeline on Ray Data.

1. `materialise`: once per run, the selected pool images (or every image of `distill.shards`) are read
   from their WebDataset shards, filtered to the selected keys, decoded and resized in map_batches,
   joined with their targets and weights, and written as Parquet into `<distill>/train_data/`
   (temporary folder, renamed, then a done marker: idempotent).
2. `epoch_order`: which row every (worker, step) trains on is a pure function of (seed, epoch, rank):
   per epoch, train_data's row groups in a seeded order, rows shuffled within windows of whole row
   groups (>= `augment.shuffle_buffer` rows), the sequence cut into `workers` equal parts of
   steps_per_epoch x batch_size rows (the remainder is left out that epoch).
3. `pass_items`: one worker's rows for one pass (the rest of the current epoch and up to
   `epochs_per_pass` more) as work items of up to aug_batch_rows rows, in training order; each item's
   rows are read from their row groups and augmented with per-row seeds (augment.row_rng). A resume at
   any step takes exactly the rows (and augmentations) the uninterrupted run would have taken.
4. Where the items run (`distill.feed`): `local_pass`, a thread in the training process (default), or
   `pass_dataset`, a Ray Data dataset in a fixed order (preserve_order) planned by the `EpochFeed`
   actor; the same batches either way.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.block import BlockAccessor
from ray.data.extensions import ArrowTensorArray

from ..errors import UserError
from ..pool.source import make_datasource
from ..shards.decode import Damaged, decode_image
from ..shards.tario import shard_name
from ..stage import fingerprint
from ..tables import atomic_write_json
from .augment import augment_batch
from .config import AugmentConfig

DONE = "_done.json"
ROWS_PER_FILE = 1024


def _decode_rows(batch, *, lookup: Optional[dict], size: int, channels: int, max_pixels: int,
                 k: int, with_labels: bool, reduced: bool = True) -> pa.Table:
    """map_batches UDF over the pool reader's rows (pool/source.py: key, shard, ext, data, reason, label):
    keep the selected keys, decode + resize, attach idx/weight/targets/label."""
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
    # the same rows in the same files on every run: the training order is planned on row positions (epoch_order)
    ds.context.execution_options.preserve_order = True
    ds.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))
    os.replace(tmp, folder)
    rec = {"fingerprint": fp, "rows": rows, "k": k, "has_targets": selection is not None,
           "expected": n_expected, "seconds": round(time.perf_counter() - t0, 2), "inputs": inputs}
    atomic_write_json(folder / DONE, rec)
    return rec


def _decode_batch_task(batch, *, lookup_ref, **kw) -> pa.Table:
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


def train_index(train_dir: str) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of train_data in a fixed order (sorted names): a row's id is its position."""
    units = []
    for path in sorted(Path(train_dir).glob("*.parquet")):
        md = pq.ParquetFile(path).metadata
        units += [(str(path), g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return units


def epoch_order(sizes: list[int], seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, window number of each) of every train_data row in `epoch`'s order.

    Row groups (of `sizes` rows) come in a seeded order; consecutive ones are grouped into windows of
    >= `window` rows whose rows are permuted together (window 0: each row group alone, in file order).
    Reading whole row groups keeps a task's reads sequential; the windows mix rows across them.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x0D5D])
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    rows, wins, cur = [], [], []

    def close() -> None:
        w = np.concatenate(cur)
        rows.append(rng.permutation(w) if window else w)
        wins.append(np.full(len(w), len(wins)))
        cur.clear()

    for u in rng.permutation(len(sizes)):
        cur.append(np.arange(starts[u], starts[u + 1]))
        if sum(map(len, cur)) >= window:
            close()
    if cur:
        close()
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(wins)


def pass_items(spec: dict, sizes: list[int], start_step: int, rank: int) -> tuple[list[dict], int]:
    """(work items, end step) of `rank`'s pass starting at `start_step`: rows of consecutive steps, items
    of at most `aug_batch_rows` rows of one window, {"epoch", "rows": int64 row ids as bytes}, in
    training order. Small items keep data tasks short, so neither worker's pipeline holds the data CPUs
    for long (a task reads its window's row groups whole: cheap for the small images distilled here)."""
    spe, total, bs = spec["steps_per_epoch"], spec["total_steps"], spec["batch_size"]
    end = min(total, (start_step // spe + spec["epochs_per_pass"]) * spe)
    part = spe * bs  # each worker's rows per epoch: equal steps on every worker
    items, s = [], start_step
    while s < end:
        e = s // spe
        stop = min(end, (e + 1) * spe)
        rows, wins = epoch_order(sizes, spec["seed"], e, spec["augment"]["shuffle_buffer"])
        lo, hi = rank * part + (s - e * spe) * bs, rank * part + (stop - e * spe) * bs
        rows, wins = rows[lo:hi], wins[lo:hi]
        cuts = np.flatnonzero(np.diff(wins)) + 1
        for frag in np.split(rows, cuts):
            for c in range(0, len(frag), spec["aug_batch_rows"]):
                items.append({"epoch": e, "rows": frag[c:c + spec["aug_batch_rows"]].astype(np.int64).tobytes()})
        s = stop
    return items, end


class RowGroups:
    """Reads train_data row groups, keeping the last `keep` (an item's window spans a few row groups
    and the next items of one worker's pass come from the same window: read once, not once per item)."""

    def __init__(self, keep: int = 0):
        self.keep = keep
        self.tables: dict[tuple[str, int], pa.Table] = {}
        self.files: dict[str, pq.ParquetFile] = {}

    def read(self, path: str, g: int) -> pa.Table:
        t = self.tables.pop((path, g), None)
        if t is None:
            f = self.files.get(path) or self.files.setdefault(path, pq.ParquetFile(path))
            t = f.read_row_group(int(g))
        if self.keep:
            self.tables[(path, g)] = t  # most recent last
            while len(self.tables) > self.keep:
                self.tables.pop(next(iter(self.tables)))
        return t


def unit_starts(units: list) -> np.ndarray:
    """First row position of every row group of train_data's fixed order (and the total at the end)."""
    return np.concatenate([[0], np.cumsum([n for *_, n in units], dtype=np.int64)])


def _take_rows(units: list, starts: np.ndarray, rows: np.ndarray, groups: RowGroups) -> pa.Table:
    """Rows `rows` (positions in train_data's fixed order) as one table, in that order."""
    unit = np.searchsorted(starts, rows, side="right") - 1
    used = np.unique(unit)  # read each row group once, however its rows are spread over the item
    offset = np.zeros(len(units), np.int64)
    tables, n = [], 0
    for u in used:
        path, g, size = units[u]
        tables.append(groups.read(path, g))
        offset[u], n = n, n + size
    return pa.concat_tables(tables).take(pa.array(offset[unit] + rows - starts[unit]))


def _augment_kwargs(spec: dict, units: list) -> dict:
    """What `_read_augment` needs beside an item, the same for both feeds (the augmentation validated once)."""
    return dict(units=units, starts=unit_starts(units), views=spec["views"], aug=AugmentConfig.model_validate(spec["augment"]),
                mean=spec["mean"], std=spec["std"], seed=spec["seed"], chunk=spec["aug_batch_rows"])


def _read_augment(batch: dict, *, units: list, starts: np.ndarray, views: int, aug, mean, std, seed: int,
                  chunk: int, groups: Optional[RowGroups] = None):
    """map_batches UDF on one work item: read its row groups, take its rows in order, augment, yield chunks."""
    epoch = int(batch["epoch"][0])
    table = _take_rows(units, starts, np.frombuffer(batch["rows"][0], np.int64), groups or RowGroups())
    for c in range(0, table.num_rows, chunk):
        part = BlockAccessor.for_block(table.slice(c, chunk)).to_batch_format("numpy")
        yield augment_batch(part, views=views, aug=aug, mean=mean, std=std, seed=(seed, epoch))


def pass_dataset(spec: dict, units: list, start_step: int, rank: int):
    """(dataset, end step) of `rank`'s pass from `start_step`: its rows in training order, augmented."""
    items, end = pass_items(spec, [n for *_, n in units], start_step, rank)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_read_augment, batch_size=1, batch_format="numpy", num_cpus=spec["data_cpus"],
                        fn_kwargs=_augment_kwargs(spec, units))
    # the dataset carries its DataContext to the worker that iterates it
    ds.context.execution_options.preserve_order = True  # training order is the items' order
    ds.context.enable_progress_bars = False  # one bar per pass per worker is noise
    return ds, end


class EpochFeedImpl:
    """Plans each training worker's pass (pass_dataset) from train_data's row-group index, read once.

    Stateless beyond the index: a worker asking for (start_step, rank) gets the same rows every time,
    so a restarted worker group resumes on exactly the rows the failed one would have trained on.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.units = train_index(spec["train_dir"])
        self.iters: dict[int, Any] = {}

    def split(self, start_step: int, rank: int):
        """(this rank's DataIterator, the step at which the pass ends).

        A one-way streaming_split runs the pipeline in a coordinator actor of its own, in order, rather
        than in the training process (whose Python thread it would share); kept here while in use.
        """
        ds, end = pass_dataset(self.spec, self.units, start_step, rank)
        self.iters[rank] = ds.streaming_split(1, equal=False)[0]
        return self.iters[rank], end


def _to_torch(chunk: dict) -> dict:
    return {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in chunk.items()}


def _rebatch(chunks, bs: int):
    """Chunks of any size (dicts of equal-length arrays) -> batches of exactly `bs` rows, in order."""
    buf: list[dict] = []
    have = 0
    for c in chunks:
        buf.append(c)
        have += len(next(iter(c.values())))
        while have >= bs:
            cat = {k: np.concatenate([b[k] for b in buf]) if len(buf) > 1 else buf[0][k] for k in buf[0]}
            yield {k: v[:bs] for k, v in cat.items()}
            rest = {k: v[bs:] for k, v in cat.items()}
            have -= bs
            buf = [rest] if have else []


def _window_groups(spec: dict, units: list) -> int:
    """Row groups one shuffle window can span (epoch_order closes a window at >= shuffle_buffer rows)."""
    smallest = min((n for *_, n in units), default=1) or 1
    return max(2, -(-spec["augment"]["shuffle_buffer"] // smallest) + 1)


def local_pass(spec: dict, units: list, start_step: int, rank: int, prefetch: int = 4):
    """(batches, end step) of `rank`'s pass from `start_step`, made in the training process: the same
    items as `pass_dataset`, read and augmented in order by one background thread that keeps up to
    `prefetch` batches ready. Batches equal those of the Ray Data feed bit for bit."""
    items, end = pass_items(spec, [n for *_, n in units], start_step, rank)
    kw = _augment_kwargs(spec, units) | {"groups": RowGroups(keep=_window_groups(spec, units))}
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            chunks = (c for it in items for c in _read_augment({"epoch": [it["epoch"]], "rows": [it["rows"]]}, **kw))
            for b in _rebatch(chunks, spec["batch_size"]):
                if stop.is_set():
                    return
                q.put(_to_torch(b))
            q.put(done)
        except BaseException as e:  # handed to the training thread, which raises it
            q.put(e)

    threading.Thread(target=produce, name=f"odsd-feed-r{rank}", daemon=True).start()

    def batches():
        try:
            while True:
                b = q.get()
                if b is done:
                    return
                if isinstance(b, BaseException):
                    raise b
                yield b
        finally:
            stop.set()
            while not q.empty():  # unblock a producer waiting on a full queue
                q.get_nowait()

    return batches(), end


def epoch_feed(spec: dict):
    """The EpochFeed actor (no CPU reserved: it only plans; Ray Data tasks do the work)."""
    return ray.remote(num_cpus=0)(EpochFeedImpl).remote(spec)
