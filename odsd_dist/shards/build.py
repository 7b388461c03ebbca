"""`odsd shards build`: write img2dataset-style WebDataset shards from an image folder or numpy arrays.

Layout (the same as ../shared/data/build.py writes): `NNNNN.tar` holding, per sample, KEY.jpg|png,
KEY.json and, when labelled, KEY.cls (the label as text); an `NNNNN.parquet` sidecar per shard; and
`classes.json` (index = label) for labelled sets. Keys have 9 digits: 5 of the shard, 4 of the
position. Tars are byte-for-byte deterministic (sorted inputs; the tar writer, `writer.py`, fixes every
header field) and written atomically (temporary name, then rename).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..tables import atomic_write_bytes
from .decode import FORMAT_EXT, IMAGE_EXTS, Damaged, open_image
from .writer import DEFAULT_SHARD_SIZE, ShardWriter, check_shard_size

FORMATS = ("png", "jpg", "keep")
JPEG_QUALITY = 95
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")

POOL_SIDECAR = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()),
                          ("width", pa.int64()), ("height", pa.int64()), ("sha256", pa.string())])
LABELLED_SIDECAR = pa.schema([("key", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
                              ("source_name", pa.string()), ("width", pa.int64()), ("height", pa.int64())])


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    """uint8 (H,W), (H,W,1) or (H,W,3) -> PNG or JPEG bytes, deterministically."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode=None)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpg":
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    else:
        raise ValueError(f"format must be png or jpg, got {fmt!r}")
    return buf.getvalue()


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _prepare_out(out: Path, overwrite: bool, shard_size: int) -> None:
    check_shard_size(shard_size)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, not a folder: {out}")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"output folder already holds shards: {out} (use --overwrite to replace them)")
    for p in existing:
        p.unlink()
        p.with_suffix(".parquet").unlink(missing_ok=True)
    if existing:
        (out / "classes.json").unlink(missing_ok=True)


def _write_classes(out: Path, class_names: Sequence[str]) -> str:
    path = out / "classes.json"
    atomic_write_bytes(path, json.dumps(list(class_names)).encode())
    return str(path)


def _sample_members(key: str, data: bytes, ext: str, meta: dict, label: Optional[int]) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", data)]
    if label is not None:
        members.append((f"{key}.cls", str(int(label)).encode()))
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def _encode_source(raw: bytes, ext: str, fmt: str) -> tuple[bytes, str, int, int]:
    """Check a source file fully decodes; return (bytes to store, extension, width, height). Raises Damaged."""
    im = open_image(raw, ext)
    w, h = im.size
    if fmt == "keep":
        return raw, FORMAT_EXT[im.format], w, h
    grey = im.mode in _GREY_MODES
    arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    return encode_image(arr, fmt), fmt, w, h


def _list_folder(src: Path) -> tuple[list[tuple[Path, Optional[int]]], Optional[list[str]]]:
    """Sorted (file, label) pairs; class sub-folders -> labels, flat -> None."""
    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)

    subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        classes = [d.name for d in subdirs]
        files = [(p, i) for i, d in enumerate(subdirs) for p in images(d)]
        return files, classes
    return [(p, None) for p in images(src)], None


def build_from_folder(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
                      fmt: str = "png", shuffle_seed: Optional[int] = None, overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Shards from an image folder: class sub-folders -> labelled (label = sorted sub-folder index),
    flat -> unlabelled pool. Files that do not decode are skipped and counted by reason."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"image folder not found: {src}")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    files, classes = _list_folder(src)
    if not files:
        raise UserError(f"no {'/'.join(IMAGE_EXTS)} images in {src} (or in its class sub-folders)")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    _prepare_out(out, overwrite, shard_size)
    t0 = time.time()
    writer = ShardWriter(out, LABELLED_SIDECAR if classes else POOL_SIDECAR, shard_size)
    skipped: dict[str, int] = {}
    bar = _progress(len(files), f"build {out.name}", progress)
    try:
        for path, label in files:
            bar.update(1)
            raw = path.read_bytes()
            try:
                data, ext, w, h = _encode_source(raw, path.suffix.lower().lstrip("."), fmt)
            except Damaged as d:
                skipped[d.reason] = skipped.get(d.reason, 0) + 1
                continue
            _add_entry(writer, data, ext, path.relative_to(src).as_posix(), w, h,
                       label if classes else None, classes)
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if classes:
        written.append(_write_classes(out, classes))
    return _summary(out, writer, written, classes, skipped, t0)


def _add_entry(writer, data: bytes, ext: str, source_name: str, w: int, h: int,
               label: Optional[int], class_names: Optional[Sequence[str]]) -> None:
    """One sample: labelled (label + class_name, sidecar source_name) or pool (url, status, sha256)."""
    key = writer.next_key()
    if label is not None:
        meta = {"key": key, "label": label, "class_name": class_names[label], "width": w, "height": h}
        row = dict(meta, source_name=source_name)
    else:
        meta = {"key": key, "url": source_name, "status": "success", "width": w, "height": h,
                "sha256": hashlib.sha256(data).hexdigest()}
        row = meta
    writer.add(_sample_members(key, data, ext, meta, label), row)


def build_from_arrays(images: np.ndarray, labels: Optional[np.ndarray], out: str | os.PathLike,
                      class_names: Optional[Sequence[str]] = None, shard_size: int = DEFAULT_SHARD_SIZE,
                      fmt: str = "png", source: str = "array", overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Shards from uint8 images (N,H,W) or (N,H,W,1|3) and optional int labels (N,), in array order."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise UserError(f"images must have shape (N,H,W) or (N,H,W,3), got {images.shape}")
    if fmt not in ("png", "jpg"):
        raise UserError(f"--format for arrays must be png or jpg, got {fmt!r}")
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise UserError(f"labels has {len(labels)} entries for {n} images")
        if not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
            raise UserError("labels must be non-negative integers")
        n_cls = int(labels.max()) + 1 if n else 0
        if class_names is None:
            class_names = [str(i) for i in range(n_cls)]
        class_names = [str(c) for c in class_names]
        if len(class_names) < n_cls:
            raise UserError(f"{len(class_names)} class names for labels up to {n_cls - 1}")
    elif class_names is not None:
        raise UserError("class names given without labels")
    out = Path(out)
    _prepare_out(out, overwrite, shard_size)
    t0 = time.time()
    writer = ShardWriter(out, LABELLED_SIDECAR if labels is not None else POOL_SIDECAR, shard_size)
    h, w = images.shape[1], images.shape[2]
    bar = _progress(n, f"build {out.name}", progress)
    try:
        for i in range(n):
            bar.update(1)
            _add_entry(writer, encode_image(images[i], fmt), fmt, f"{source}[{i}]", w, h,
                       None if labels is None else int(labels[i]), class_names)
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if labels is not None:
        written.append(_write_classes(out, class_names))
    return _summary(out, writer, written, class_names if labels is not None else None, {}, t0)


def _summary(out: Path, writer: ShardWriter, written: list[str], classes, skipped: dict, t0: float) -> dict:
    tars = [p for p in written if p.endswith(".tar")]
    return {
        "out": str(out),
        "shards": tars,
        "samples": writer.samples,
        "labelled": classes is not None,
        "class_names": list(classes) if classes is not None else None,
        "skipped": skipped,
        "bytes": sum(os.path.getsize(p) for p in written),
        "seconds": round(time.time() - t0, 3),
    }


def add_build_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `odsd shards build`."""
    p.add_argument("src", nargs="?", help="image folder: class sub-folders -> labelled shards, flat -> unlabelled pool")
    p.add_argument("--npz", help="numpy .npz with `images` (N,H,W[,C]) uint8, optional `labels` (N,) and `class_names`")
    p.add_argument("--out", "-o", required=True, help="output folder for NNNNN.tar + NNNNN.parquet (+ classes.json)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="png",
                   help="image member format (default png: lossless, right for grey); keep = original bytes (folders)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (default 5000)")
    p.add_argument("--class-names", help="comma-separated class names, or a JSON list file (npz input)")
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle folder files with this seed (default: sorted order)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _class_names_arg(value: Optional[str]) -> Optional[list[str]]:
    if not value:
        return None
    if os.path.isfile(value):
        try:
            names = json.loads(Path(value).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--class-names {value}: not a JSON list ({e})") from None
        if not isinstance(names, list):
            raise UserError(f"--class-names {value}: not a JSON list")
        return [str(x) for x in names]
    return [s.strip() for s in value.split(",")]


def load_npz(path: str) -> tuple[np.ndarray, Optional[np.ndarray], Optional[list[str]]]:
    """images, labels, class names from an .npz, never unpickling (allow_pickle=False)."""
    if not os.path.isfile(path):
        raise UserError(f"--npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise UserError(f"--npz {path}: no `images` array (has: {', '.join(z.files)})")
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
            names = [str(x) for x in z["class_names"].tolist()] if "class_names" in z.files else None
    except (ValueError, OSError) as e:
        raise UserError(f"--npz {path}: cannot read ({e})") from None
    return images, labels, names


def build_cli(args: argparse.Namespace) -> dict:
    """Run `odsd shards build` and print a one-screen summary."""
    if bool(args.src) == bool(args.npz):
        raise UserError("give either an image folder or --npz FILE (exactly one)")
    progress = not args.no_progress
    if args.npz:
        images, labels, names = load_npz(args.npz)
        names = _class_names_arg(args.class_names) or names
        fmt = "png" if args.fmt == "keep" else args.fmt
        summary = build_from_arrays(images, labels, args.out, class_names=names if labels is not None else None,
                                    shard_size=args.shard_size, fmt=fmt, source=Path(args.npz).name,
                                    overwrite=args.overwrite, progress=progress)
    else:
        summary = build_from_folder(args.src, args.out, shard_size=args.shard_size, fmt=args.fmt,
                                    shuffle_seed=args.shuffle_seed, overwrite=args.overwrite, progress=progress)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    kind = f"labelled, {len(s['class_names'])} classes" if s["labelled"] else "unlabelled pool"
    print(f"wrote {s['samples']:,} samples ({kind}) in {len(s['shards'])} shards to {s['out']} "
          f"({s['bytes'] / 1e6:.1f} MB, {s['seconds']:.1f}s)")
    if s["skipped"]:
        print("skipped (not decodable): " + ", ".join(f"{r}={n}" for r, n in sorted(s["skipped"].items())))
