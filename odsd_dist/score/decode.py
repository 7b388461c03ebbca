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


def decode_rows(batch: pd.DataFrame, size: int, channels: int, max_pixels: int) -> dict:
    """Decode one batch of webdataset rows into images plus identity and damage columns."""
    n = len(batch)
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    reasons, details, keys, shards, urls = [], [], [], [], []
    cols = [c for c in IMAGE_EXTS if c in batch.columns]
    json_col = batch["json"] if "json" in batch.columns else None
    for i in range(n):
        keys.append(str(batch["__key__"].iat[i]))
        shards.append(Path(str(batch["__url__"].iat[i])).stem)
        urls.append(_url_of(json_col.iat[i]) if json_col is not None else "")
        ext, data = None, None
        for c in cols:
            v = batch[c].iat[i]
            if isinstance(v, (bytes, bytearray)):
                ext, data = c, v
                break
        reason, detail = "", ""
        if ext is None:
            reason, detail = "no_image", "no image member (" + ",".join(IMAGE_EXTS) + ")"
        else:
            try:
                images[i] = decode_image(bytes(data), ext, size, channels, max_pixels)
            except Damaged as d:
                reason, detail = d.reason, str(d.detail)[:500]
        reasons.append(reason)
        details.append(detail)
    return {
        "key": np.array(keys, dtype=object),
        "shard": np.array(shards, dtype=object),
        "url": np.array(urls, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
        "image": images,
    }
