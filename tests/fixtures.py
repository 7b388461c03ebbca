"""Small synthetic data that tests make for themselves (tests never read ../shared).

- `make_pool_shards`: unlabelled pool shards in the img2dataset layout (the same writer as
  `odsd shards build`), a jpg/png/webp mix with a few grey and a few 2x-size images, and at least
  one entry of every damage kind; returns the expected counts and keys.
- `make_labelled_shards`: CIFAR-style labelled shards + classes.json (channels=1 -> grey PNGs).

Images are coloured shapes on a noisy background, one shape/colour per class, so a tiny teacher
trained on the labelled shards makes non-degenerate predictions on the pool.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from odsd_dist.shards.build import POOL_SIDECAR, build_from_arrays, encode_image
from odsd_dist.shards.writer import ShardWriter

PALETTE = [(230, 40, 40), (40, 200, 60), (50, 80, 240), (240, 220, 40), (200, 60, 220),
           (40, 220, 220), (250, 140, 30), (255, 255, 255), (120, 70, 20), (150, 150, 150)]
SHAPES = ["disc", "square", "triangle", "cross", "ring"]
NOT_IMAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
DAMAGE_KINDS = ("truncated", "empty", "not_image", "bomb", "no_image")
BOMB_SIDE = 50_000
# The start of a Photoshop file (a recognised image format odsd-dist does not decode: `unsupported`).
PSD_HEADER = b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + (32).to_bytes(4, "big") * 2 + b"\x00\x08\x00\x03" + bytes(64)


def class_names(n_classes: int) -> list[str]:
    """'red_disc', 'green_square', ...: class k is shape k % 5 in colour k % 10."""
    colours = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white", "brown", "grey"]
    return [f"{colours[k % 10]}_{SHAPES[k % 5]}" + (f"_{k // 10}" if k >= 10 else "") for k in range(n_classes)]


def shape_image(cls: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """One uint8 image of class `cls`: its shape in its colour, jittered, on a dark noisy background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.2, 0.3)
    dy, dx = yy - cy, xx - cx
    shape = SHAPES[cls % 5]
    if shape == "disc":
        mask = dy**2 + dx**2 < r**2
    elif shape == "square":
        mask = (abs(dy) < r * 0.85) & (abs(dx) < r * 0.85)
    elif shape == "triangle":
        mask = (dy < r * 0.8) & (dy > -r) & (abs(dx) < (dy + r) * 0.6)
    elif shape == "cross":
        mask = ((abs(dy) < r * 0.3) & (abs(dx) < r)) | ((abs(dx) < r * 0.3) & (abs(dy) < r))
    else:
        mask = (dy**2 + dx**2 < r**2) & (dy**2 + dx**2 > (r * 0.55) ** 2)
    img = rng.integers(0, 70, (size, size, 3)).astype(np.float32)
    colour = np.array(PALETTE[cls % 10], np.float32) * rng.uniform(0.8, 1.0)
    img[mask] = colour + rng.normal(0, 12, (int(mask.sum()), 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 1:
        grey = np.asarray(Image.fromarray(img).convert("L"))
        return grey[:, :, None]
    return img


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A tiny grey PNG whose IHDR declares side x side pixels (a decompression bomb), like sources/bomb.png."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)  # four rows of zeros: enough to look plausible
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    if fmt in ("png", "jpg"):
        return encode_image(arr, fmt)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=90, method=4)
    return buf.getvalue()


def make_pool_shards(folder: str | Path, n_shards: int = 2, per_shard: int = 40, damage: bool = True,
                     size: int = 32, seed: int = 0, n_classes: int = 3, unsupported: bool = False) -> dict:
    """Unlabelled pool shards 00000.tar... (+ .parquet sidecars) in `folder`; returns what they hold.

    Damage (when `damage`): 3 truncated (one jpg, png, webp), 1 empty, 1 not_image, 1 bomb,
    1 no_image, and with `unsupported` one Photoshop file saved as .png. 80% of intact images show one of
    `n_classes` shapes (`classes[key]`), 20% are clutter (class -1); ~10% grey, ~6% twice `size`.

    Returns {"folder", "paths", "n", "intact", "damaged": {reason: n}, "keys_by_reason": {reason: [keys]},
    "intact_keys", "classes": {key: class or -1}, "grey_keys", "formats": {ext: n}}.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    total = n_shards * per_shard
    plan: list[str] = []
    if damage:
        plan = ["truncated", "truncated", "truncated", "empty", "not_image", "bomb", "no_image"]
        if unsupported:
            plan.append("unsupported")
    if len(plan) > total:
        raise ValueError(f"{total} entries cannot hold {len(plan)} damaged ones")
    # spread the damaged entries over the shards, deterministically
    slots = sorted(rng.choice(total, size=len(plan), replace=False).tolist())
    damaged_at = dict(zip(slots, plan))
    trunc_fmts = iter(["jpg", "png", "webp"])
    writer = ShardWriter(folder, POOL_SIDECAR, per_shard)
    out: dict = {"folder": str(folder), "n": total, "keys_by_reason": {}, "intact_keys": [], "classes": {},
                 "grey_keys": [], "formats": Counter()}
    for i in range(total):
        key = writer.next_key()
        kind = damaged_at.get(i)
        cls = int(rng.integers(n_classes)) if rng.random() < 0.8 else -1
        side = size * 2 if rng.random() < 0.06 else size
        grey = rng.random() < 0.1
        arr = shape_image(cls, side, rng, 1 if grey else 3) if cls >= 0 else \
            rng.integers(0, 256, (side, side, 1 if grey else 3), dtype=np.uint8)
        u = rng.random()
        fmt = "jpg" if u < 0.6 else ("png" if u < 0.8 else "webp")
        if kind == "truncated":
            fmt = next(trunc_fmts)
        data = _encode(arr, fmt)
        if kind == "truncated":
            data = data[: max(16, len(data) // 2)]
        elif kind == "empty":
            data = b""
        elif kind == "not_image":
            data = NOT_IMAGE
        elif kind == "bomb":
            fmt, data = "png", bomb_png()
        elif kind == "unsupported":
            fmt, data = "png", PSD_HEADER
        url = f"https://pool.example/{i:06d}.{fmt}"
        meta = {"key": key, "url": url, "status": "success", "width": side, "height": side,
                "sha256": hashlib.sha256(data).hexdigest()}
        members = [] if kind == "no_image" else [(f"{key}.{fmt}", data)]
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        writer.add(members, meta)
        if kind:
            out["keys_by_reason"].setdefault(kind, []).append(key)
        else:
            out["intact_keys"].append(key)
            out["classes"][key] = cls
            out["formats"][fmt] += 1
            if grey:
                out["grey_keys"].append(key)
    written = writer.close()
    out["paths"] = [p for p in written if p.endswith(".tar")]
    out["intact"] = len(out["intact_keys"])
    out["damaged"] = {k: len(v) for k, v in out["keys_by_reason"].items()}
    out["formats"] = dict(out["formats"])
    return out


def make_labelled_shards(folder: str | Path, n_classes: int = 3, per_class: int = 20, size: int = 32,
                         channels: int = 3, n_shards: int = 1, seed: int = 0,
                         fmt: Optional[str] = None) -> dict:
    """CIFAR-style labelled shards (KEY.jpg|png + KEY.cls + KEY.json) + classes.json in `folder`.

    RGB -> JPEG like CIFAR-10, grey (channels=1, e.g. size=28) -> PNG. Class-balanced, shuffled.
    Returns {"folder", "paths", "n", "class_names", "labels" (int64, in key order), "images" (uint8 source)}.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    rng.shuffle(labels)
    images = np.stack([shape_image(int(c), size, rng, channels) for c in labels])
    names = class_names(n_classes)
    fmt = fmt or ("jpg" if channels == 3 else "png")
    shard_size = math.ceil(len(labels) / n_shards)
    summary = build_from_arrays(images, labels, folder, class_names=names, shard_size=shard_size, fmt=fmt,
                                source="fixture", overwrite=True, progress=False)
    return {"folder": str(folder), "paths": summary["shards"], "n": len(labels), "class_names": names,
            "labels": labels, "images": images}


def make_teacher(path: str | Path, arch: str = "resnet8", class_names: Optional[list[str]] = None, size: int = 32,
                 channels: int = 3, seed: int = 0) -> str:
    """A real (randomly initialised) zoo model saved as a teacher safetensors with full metadata."""
    import torch

    from odsd_dist.models import build_model, save_model

    names = class_names or [f"class{i}" for i in range(10)]
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=len(names), in_chans=channels)
    meta = {"arch": arch, "num_classes": len(names), "in_chans": channels, "input_size": size,
            "mean": [0.5] * channels, "std": [0.25] * channels, "class_names": names}
    save_model(model, path, meta)
    return str(path)


def wait_for(pred, timeout: float, what: str, every: float = 0.05):
    """pred()'s first truthy value, polled every `every` s; AssertionError naming `what` after `timeout` s."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
