"""Parquet schemas (declared once), atomic writes, table metadata and the per-unit ledger.

Every table carries, in its Parquet key-value metadata under b"odsd", the producing stage, its
resolved config section and the teacher identity (sha256 of the weights file).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"odsd"

QUARANTINE_REASONS = ("truncated", "empty", "not_image", "bomb", "no_image", "unsupported", "bad_key", "duplicate_key")


def score_schema(feature_dim: int) -> pa.Schema:
    """METHODS.md §1.1: one row per intact pool key."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("url", pa.string()),
            ("pred", pa.int32()),
            ("maxprob", pa.float32()),
            ("entropy", pa.float32()),
            ("energy", pa.float32()),
            ("topk_idx", pa.list_(pa.int32())),
            ("topk_logit", pa.list_(pa.float32())),
            ("feature", pa.list_(pa.float16(), feature_dim)),
        ]
    )


QUARANTINE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# METHODS.md §1.3: the selected images with their sparse low-noise teacher targets.
SELECTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("url", pa.string()),
        ("pred", pa.int32()),
        ("score", pa.float32()),
        ("weight", pa.float32()),
        ("target_idx", pa.list_(pa.int32())),
        ("target_prob", pa.list_(pa.float32())),
    ]
)


def with_meta(table: pa.Table, meta: dict) -> pa.Table:
    """Attach the odsd metadata (JSON) to a table's schema, keeping existing metadata."""
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(existing)


def read_meta(path: str | os.PathLike) -> dict:
    md = pq.read_schema(path).metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def temp_path(path: Path) -> Path:
    """A fresh temporary file beside `path`, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def parquet_options(schema: pa.Schema) -> dict:
    """zstd; dictionary encoding only where it can pay (not on float columns: Parquet's dictionary attempt
    on a score table's float16 features made writing and reading slower, docs/BENCHMARKS.md, design notes);
    float columns byte-stream-split (their bytes grouped by significance: zstd packs them tighter)."""
    dictionary, split = [], []
    for field in schema:
        t = field.type
        if pa.types.is_floating(t):
            split.append(field.name)
        elif (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(t.value_type):
            split.append(f"{field.name}.list.element")
        else:
            dictionary.append(field.name)
    return {"compression": "zstd", "use_dictionary": dictionary, "use_byte_stream_split": split}


def write_table(table: pa.Table, path: str | os.PathLike, meta: Optional[dict] = None) -> None:
    """Write a Parquet table atomically (parquet_options), with odsd metadata when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        table = with_meta(table, meta)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, **parquet_options(table.schema))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash never leaves a renamed, empty table
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Ledger:
    """Finished units (shards, epochs, ...) of one stage, one small JSON file per unit.

    A unit counts as done only if its record carries the stage fingerprint, so a changed config or
    teacher never reuses stale work. Each record is written atomically after the unit's outputs.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def _path(self, unit: str) -> Path:
        return self.folder / f"{unit}.json"

    def get(self, unit: str) -> Optional[dict]:
        try:
            rec = json.loads(self._path(unit).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return rec if rec.get("fingerprint") == self.fingerprint else None

    def is_done(self, unit: str) -> bool:
        return self.get(unit) is not None

    def drop(self, unit: str) -> None:
        """Forget a unit (before its outputs are removed, so the ledger never names a missing file)."""
        self._path(unit).unlink(missing_ok=True)

    def mark(self, unit: str, info: dict) -> None:
        atomic_write_json(self._path(unit), {**info, "unit": unit, "fingerprint": self.fingerprint})

    def done_units(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if self.is_done(p.stem))
