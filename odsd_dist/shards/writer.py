"""The one WebDataset tar writer: deterministic headers, written atomically.

`TarWriter` writes one tar: every member gets the same header fields (fixed mtime, mode 0644, uid/gid 0,
empty owner names, ustar), so the same members in the same order give the same bytes on every run and
machine; the tar is written under a temporary name beside its final one and renamed into place on
`close()`, so a reader never sees half a shard. `ShardWriter` rolls samples over NNNNN.tar shards of
`shard_size` samples, each with an optional img2dataset Parquet sidecar.

Used by `odsd shards build`, `sample.reshard`, `bench/quality`'s validation split and `bench/webpool.py`.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from ..errors import UserError
from ..tables import temp_path, write_table

MTIME = 1700000000  # fixed, so that tars are reproducible (as in ../shared/data/build.py)
DEFAULT_SHARD_SIZE = 5000


class TarWriter:
    """One tar at `path`: `add(name, data)` or `add_sample(sample)`, then `close()` (or `abort()`).

    As a context manager it closes on success and aborts (removes the temporary file) on an exception.
    """

    def __init__(self, path: str | os.PathLike, mtime: int = MTIME):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mtime = mtime
        self.tmp = temp_path(self.path)
        self.tar: Optional[tarfile.TarFile] = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), self.mtime, 0o644, 0, 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def add_sample(self, sample: dict) -> None:
        """The byte members of a `tario.iter_samples` dict, as KEY.SUFFIX in suffix order (`__key__` etc. skipped)."""
        for suffix, data in sorted(sample.items()):
            if not suffix.startswith("__") and isinstance(data, (bytes, bytearray)):
                self.add(f"{sample['__key__']}.{suffix}", data)

    def close(self) -> Path:
        self.tar.close()
        self.tar = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_shard_size(shard_size: int) -> None:
    if not 1 <= shard_size <= 10000:
        raise UserError(f"--shard-size must be between 1 and 10000 (4-digit positions), got {shard_size}")


def key_of(shard: int, pos: int) -> str:
    """img2dataset key: 5 digits of shard, 4 of position."""
    return f"{shard:05d}{pos:04d}"


class ShardWriter:
    """Writes NNNNN.tar shards of `shard_size` samples, each with an NNNNN.parquet sidecar unless
    `sidecar_schema` is None.

    `add(members, row)` appends one sample's (name, bytes) members and its sidecar row; a shard is
    closed after `shard_size` samples (or by `close()`), so keys come from `next_key()`.
    """

    def __init__(self, folder: str | os.PathLike, sidecar_schema: Optional[pa.Schema],
                 shard_size: int = DEFAULT_SHARD_SIZE, mtime: int = MTIME):
        check_shard_size(shard_size)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema, self.shard_size, self.mtime = sidecar_schema, shard_size, mtime
        self.index, self.pos = 0, 0
        self.tar: Optional[TarWriter] = None
        self.rows: list[dict] = []
        self.written: list[str] = []
        self.samples = 0

    def next_key(self) -> str:
        if self.pos == self.shard_size:
            self.close_shard()
        return key_of(self.index, self.pos)

    def _next_tar(self) -> TarWriter:
        if self.pos == self.shard_size:
            self.close_shard()
        if self.tar is None:
            self.tar = TarWriter(self.folder / f"{self.index:05d}.tar", self.mtime)
        return self.tar

    def add(self, members: Sequence[tuple[str, bytes]], row: Optional[dict] = None) -> None:
        tar = self._next_tar()
        for name, data in members:
            tar.add(name, data)
        self._added(row)

    def add_sample(self, sample: dict, row: Optional[dict] = None) -> None:
        """A `tario.iter_samples` dict, members copied byte for byte under its own key."""
        self._next_tar().add_sample(sample)
        self._added(row)

    def _added(self, row: Optional[dict]) -> None:
        if self.schema is not None:
            self.rows.append(row)
        self.pos += 1
        self.samples += 1

    def close_shard(self) -> None:
        if self.tar is None:
            self.pos = 0
            return
        path = self.tar.close()
        self.written.append(str(path))
        if self.schema is not None:
            side = path.with_suffix(".parquet")
            write_table(pa.Table.from_pylist(self.rows, schema=self.schema), side)
            self.written.append(str(side))
        self.tar, self.rows, self.index, self.pos = None, [], self.index + 1, 0

    def close(self) -> list[str]:
        self.close_shard()
        return self.written

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.abort()
            self.tar = None
