"""CPU decode step of the scoring pipeline: pool entries (pool/source.py rows) -> fixed-size uint8 images.

Runs in Ray Data `map_batches` tasks (`score.decode=tasks`), or inside the scoring actor on its own
threads (`score.decode=actor`, score/scorer.py). Damaged entries are not dropped: they keep their key with a
`reason` so the scorer can count them and the driver can write them to the quarantine table. Entries
the reader already disqualified (`bad_key`, `duplicate_key`, `no_image`) are passed on undecoded.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..shards.decode import Damaged, decode_image


def decode_rows(batch: pd.DataFrame, size: int, channels: int, max_pixels: int, reduced: bool = True) -> dict:
    """Decode one batch of entry rows into images plus identity and damage columns."""
    cols = {c: batch[c].tolist() for c in batch.columns}  # one conversion per column, not a lookup per cell
    n = len(cols["key"])
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    reasons, details = list(cols["reason"]), list(cols["detail"])
    decode_into(images, cols["data"], cols["ext"], reasons, details, range(n), size, channels, max_pixels, reduced)
    return {
        "key": np.array([str(k) for k in cols["key"]], dtype=object),
        "shard": np.array([str(s) for s in cols["shard"]], dtype=object),
        "url": np.array([str(u) for u in cols["url"]], dtype=object),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array([str(d)[:1000] for d in details], dtype=object),
        "image": images,
    }


def decode_into(images: np.ndarray, data, ext, reasons: list, details: list, rows, size: int, channels: int,
                max_pixels: int, reduced: bool) -> None:
    """Decode entries `rows` of (data, ext) into `images` in place; a damaged one gets its reason and detail.
    Entries that already carry a reason are left alone. Thread-safe for disjoint `rows`."""
    for i in rows:
        if reasons[i]:
            continue
        try:
            images[i] = decode_image(data[i], ext[i], size, channels, max_pixels, reduced)
        except Damaged as d:
            reasons[i], details[i] = d.reason, str(d.detail)[:500]
