"""A small pool built the way a crawler builds one (issue 20, docs/POOL.md): every unusual case once.

`make_crawl_pool(folder)` writes 4 tars (plain `tarfile`, member names exactly as given, so hostile
names survive) and returns what `odsd shards verify` and `odsd score` must make of them.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

DUP_KEY = "000000000"


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) % 256)], -1).astype(np.int32)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))


def exif_rotated_jpeg() -> bytes:
    """A 48x32 JPEG, red left half / blue right half, EXIF orientation 6 (shown turned 90 degrees clockwise:
    upright, red is on top)."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :24] = (255, 0, 0)
    a[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _enc(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())


def garbage_jpeg(seed: int, markers: bool) -> bytes:
    """A 1024x768 JPEG with 300 random bytes written into its entropy-coded data: without 0xFF bytes it
    still decodes (corrupt pixels, as a browser shows it); with them (and seed 5) the stream breaks."""
    data = bytearray(_enc(_picture(1024, 768, seed), "JPEG", quality=85))
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 256 if markers else 255, 300, dtype=np.uint8)  # seed 5 breaks the stream
    mid = len(data) // 2
    data[mid:mid + 300] = garbage.tobytes()
    return bytes(data)


def cases() -> list[tuple[str, str, bytes, str]]:
    """(key, member extension, bytes, expected reason or "" for scored)."""
    pic = _picture(40, 30, 0)
    frames = [_picture(40, 30, s).convert("P") for s in range(3)]
    p16 = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50))
    return [
        ("gif_animated", "gif", _enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0), ""),
        ("bmp", "bmp", _enc(pic, "BMP"), ""),
        ("tiff", "tif", _enc(pic, "TIFF", compression="tiff_lzw"), ""),
        ("cmyk_jpeg", "jpg", _enc(pic.convert("CMYK"), "JPEG"), ""),
        ("png_la", "png", _enc(pic.convert("LA"), "PNG"), ""),
        ("png_p_transparent", "png", _enc(pic.convert("P"), "PNG", transparency=0), ""),
        ("png_16bit", "png", _enc(p16, "PNG"), ""),
        ("exif_rotated", "jpg", exif_rotated_jpeg(), ""),
        ("png_named_jpg", "jpg", _enc(pic, "PNG"), ""),
        ("jpeg_named_bin", "bin", _enc(pic, "JPEG"), ""),  # unknown extension: the bytes decide
        ("one_by_one", "jpg", _enc(Image.new("RGB", (1, 1), (200, 30, 30)), "JPEG"), ""),
        ("wide_2000x8", "png", _enc(_picture(2000, 8, 1), "PNG"), ""),
        ("big_1024x768_a", "jpg", _enc(_picture(1024, 768, 2), "JPEG", quality=90), ""),
        ("big_1024x768_b", "jpg", _enc(_picture(1024, 768, 3), "JPEG", quality=90), ""),
        ("jpeg_garbage_inside", "jpg", garbage_jpeg(4, markers=False), ""),
        ("jpeg_garbage_markers", "jpg", garbage_jpeg(5, markers=True), "truncated"),
        ("zero_filled", "jpg", bytes(4096), "not_image"),
        ("zero_filled_png", "png", bytes(300), "not_image"),
        ("../../000030956", "jpg", _enc(pic, "JPEG"), "bad_key"),
        ("bad\x07bell", "jpg", _enc(pic, "JPEG"), "bad_key"),
        ("k" * 300, "jpg", _enc(pic, "JPEG"), "bad_key"),
    ]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_crawl_pool(folder: str | Path) -> dict:
    """4 shards; DUP_KEY opens every shard (the first wins); the cases are spread over the shards.

    Returns {"folder", "paths", "reasons": {reason: n}, "scored": [keys], "quarantined": sorted [(key, reason)]}
    (bad keys appear escaped in tables: `quarantined` leaves them out, `reasons` counts them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_cases = cases()
    dup = _enc(_picture(32, 32, 9), "JPEG")
    paths, scored, quarantined, reasons = [], [DUP_KEY], [], {}
    for s in range(4):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:  # GNU: names over 100 characters
            entries = [(DUP_KEY, "jpg", dup, "" if s == 0 else "duplicate_key")] + all_cases[s::4]
            for key, ext, data, reason in entries:
                meta = {"key": key, "url": f"https://crawl.example/{s}/{len(key)}.{ext}", "status": "success"}
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                if reason:
                    reasons[reason] = reasons.get(reason, 0) + 1
                    if reason != "bad_key":
                        quarantined.append((key, reason))
                elif key != DUP_KEY:
                    scored.append(key)
        paths.append(str(path))
    return {"folder": str(folder), "paths": paths, "reasons": dict(sorted(reasons.items())), "scored": sorted(scored),
            "quarantined": sorted(quarantined)}
