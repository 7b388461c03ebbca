"""Read WebDataset tars as plain bytes, without webdataset's decoders or any unpickling.

`iter_samples` streams a tar once, front to back, and groups consecutive members by key the way
WebDataset does ("dir/000000001.jpg" -> key "dir/000000001", suffix "jpg"). Nothing is decoded: a
sample is `{"__key__", "__url__", "<suffix>": bytes, ...}`.

Members are read by a small strict ustar/GNU/pax reader (faster than `tarfile` on many small members:
docs/BENCHMARKS.md, design notes): header checksums are verified, and a file that ends without its
end-of-archive block counts as truncated.

A truncated or corrupt tar does not crash the caller mid-shard: every sample read completely before
the damage is yielded, the sample in progress is dropped, and then, by default, `ShardReadError` is
raised (so the caller knows the shard is incomplete). Pass `errors=[]` to collect the error record
instead and have the iterator simply stop.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from ..errors import UserError

_KEY_RE = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # WebDataset's base_plus_ext (first dot after dir)
MAX_MEMBER_BYTES = 1 << 28  # 256 MiB: a bigger member is a broken or hostile tar, not an image


class ShardReadError(Exception):
    """A tar that could not be read to the end; `samples_read` complete samples came before the damage."""

    def __init__(self, path: str, error: str, samples_read: int, last_key: Optional[str] = None):
        super().__init__(f"{path}: {error} (after {samples_read} complete samples)")
        self.path, self.error, self.samples_read, self.last_key = path, error, samples_read, last_key

    def record(self) -> dict:
        return {"path": self.path, "error": self.error, "samples_read": self.samples_read, "last_key": self.last_key}

    def __reduce__(self):
        return (ShardReadError, (self.path, self.error, self.samples_read, self.last_key))


def split_name(name: str) -> Optional[tuple[str, str]]:
    """'a/000000001.jpg' -> ('a/000000001', 'jpg'); None for names without a suffix or hidden files."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


class _TarFormatError(Exception):
    pass


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for big numbers
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise _TarFormatError(f"invalid number field {field[:12]!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        rec = data[sp + 1: pos + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def _iter_members(f: BinaryIO, max_member_bytes: int) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream: ustar/GNU/pax headers, checksums verified.

    A plain Python reader, faster than tarfile for many small members (see the module docstring), and
    strict (a short read, a bad checksum or an oversized member raises _TarFormatError).
    """
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    while True:
        h = f.read(512)
        if not h:  # tar writers end with zero blocks: their absence means a cut file
            raise _TarFormatError("unexpected end of file: no end-of-archive block (truncated tar?)")
        if len(h) < 512:
            raise _TarFormatError("unexpected end of data in a header")
        if h == _ZERO_BLOCK:
            return
        stored = _octal(h[148:156])
        if stored != sum(h[:148]) + 256 + sum(h[156:]):
            raise _TarFormatError("invalid header checksum")
        size = _octal(h[124:136])
        flag = h[156:157]
        if flag in (b"x", b"g", b"L", b"K") or flag in (b"0", b"\0", b"7"):
            if "size" in pax and flag in (b"0", b"\0", b"7"):
                size = int(pax["size"])
            if size > max_member_bytes:
                raise _TarFormatError(f"member of {size} bytes > {max_member_bytes}")
            data = f.read(size)
            if len(data) < size:
                raise _TarFormatError("unexpected end of data")
        else:
            data = None
        pad = -size % 512
        if pad and len(f.read(pad)) < pad and data is not None:
            raise _TarFormatError("unexpected end of data in padding")
        if flag == b"x":
            pax = _pax_records(data)
            continue
        if flag == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if flag in (b"g", b"K"):
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if h[257:263] == b"ustar\0":
                prefix = h[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if data is not None:
            yield name, data


_ZERO_BLOCK = bytes(512)


def iter_samples(path: str | os.PathLike, errors: Optional[list] = None,
                 fileobj: Optional[BinaryIO] = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield one dict of member bytes per key, in tar order.

    On a read error: with `errors` None, raise ShardReadError after the complete samples; otherwise
    append its `record()` dict to `errors` and stop. Non-file members (dirs, links) are skipped;
    a member larger than `max_member_bytes` is an error (the tar is not trusted).
    """
    url = str(path)
    current: Optional[dict] = None
    done = 0
    f = None
    try:
        f = fileobj if fileobj is not None else open(url, "rb", buffering=1 << 20)
        for name, data in _iter_members(f, max_member_bytes):
            parts = split_name(name)
            if parts is None:
                continue
            key, suffix = parts
            if current is not None and current["__key__"] != key:
                yield current
                done += 1
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                raise _TarFormatError(f"duplicate member {name}")
            current[suffix] = data
    except (_TarFormatError, OSError, ValueError) as e:
        kind = "ReadError" if isinstance(e, _TarFormatError) else type(e).__name__
        err = ShardReadError(url, f"{kind}: {e}", done, current["__key__"] if current else None)
        if errors is None:
            raise err from None
        errors.append(err.record())
        return
    finally:
        if f is not None and fileobj is None:
            f.close()
    if current is not None:
        yield current


def shard_name(path: str | os.PathLike) -> str:
    """The shard id used in tables: the tar's file stem ('…/00012.tar' -> '00012')."""
    return Path(path).name[: -len(".tar")] if str(path).endswith(".tar") else Path(path).stem


def sidecar_path(path: str | os.PathLike) -> Path:
    """The img2dataset Parquet sidecar of a tar ('00012.tar' -> '00012.parquet')."""
    p = Path(path)
    return p.with_name(shard_name(p) + ".parquet")


def expand_shards(paths: list[str] | tuple[str, ...] | str) -> list[str]:
    """Files stay, folders expand to their *.tar (sorted), globs expand; anything missing is a UserError naming it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    out: list[str] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(glob.escape(p), "*.tar")))
            if not found:
                raise UserError(f"no .tar shards in folder: {p}")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise UserError(f"no shards match: {p}")
            out += found
        else:
            raise UserError(f"no such shard file or folder: {p}")
    if not out:
        raise UserError("no shard paths given")
    seen: set[str] = set()
    return [x for x in out if not (os.path.abspath(x) in seen or seen.add(os.path.abspath(x)))]
