"""CPU decode step of the scoring pipeline: webdataset rows (bytes) -> fixed-size uint8 images.

Runs in Ray Data `map_batches` tasks. Damaged entries are not dropped: they keep their key with a
`reason` so the scorer can count them and the driver can write them to the quarantine table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..shards.decode import IMAGE_EXTS, Damaged, decode_image

WDS_SUFFIXES = list(IMAGE_EXTS) + ["json"]


def _url_of(meta_bytes) -> str:
    if not isinstance(meta_bytes, (bytes, bytearray)) or not meta_bytes:
        return ""
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, UnicodeDecodeError):
        return ""
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) else ""


def decode_rows(batch: pd.DataFrame, size: int, channels: int, max_pixels: int, reduced: bool = True) -> dict:
    """Decode one batch of webdataset rows into images plus identity and damage columns."""
    cols = {c: batch[c].tolist() for c in batch.columns}  # one conversion per column, not a lookup per cell
    n = len(cols["__key__"])
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    reasons, details = [""] * n, [""] * n
    image_cols = [(c, cols[c]) for c in IMAGE_EXTS if c in cols]
    json_col = cols.get("json")
    for i in range(n):
        ext, data = None, None
        for c, values in image_cols:
            v = values[i]
            if isinstance(v, (bytes, bytearray)):
                ext, data = c, v
                break
        if ext is None:
            reasons[i], details[i] = "no_image", "no image member (" + ",".join(IMAGE_EXTS) + ")"
            continue
        try:
            images[i] = decode_image(bytes(data), ext, size, channels, max_pixels, reduced)
        except Damaged as d:
            reasons[i], details[i] = d.reason, str(d.detail)[:500]
    return {
        "key": np.array([str(k) for k in cols["__key__"]], dtype=object),
        "shard": np.array([Path(str(u)).stem for u in cols["__url__"]], dtype=object),
        "url": np.array([_url_of(m) for m in json_col] if json_col is not None else [""] * n, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
        "image": images,
    }
