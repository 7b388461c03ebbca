"""The pool reader of `odsd score`: a Ray Data datasource over pool tars, read by shards.tario.

The same reader as `odsd shards verify` (same keys, same grouping, same member choice), so the two
give the same reasons. Each read task streams one tar and emits one row per entry, in tar order:
key, shard, ordinal (the entry's position in its tar), url, the image member (chosen by
`pick_image`: content decides) and, where the key itself disqualifies the entry, its reason:
`bad_key` (key_problem) or `duplicate_key` (the pool's duplicate table, per shard, see shards/dupes.py).
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import pandas as pd
import ray
from ray.data.datasource import FileBasedDatasource

from ..shards.decode import pick_image
from ..shards.keys import bad_key_detail, key_problem, safe_repr
from ..shards.labelled import sample_label
from ..shards.tario import iter_samples, shard_name

COLUMNS = ("key", "shard", "ordinal", "url", "ext", "data", "reason", "detail")
ROWS_PER_CHUNK = 256


def url_of(meta_bytes) -> str:
    if not isinstance(meta_bytes, (bytes, bytearray)) or not meta_bytes:
        return ""
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, UnicodeDecodeError):
        return ""
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) else ""


def entry_rows(samples, shard: str, dupes: Optional[dict] = None, labels: bool = False) -> Iterator[dict]:
    """One row per sample (COLUMNS, plus `label` when `labels`: the KEY.cls / KEY.json label, -1 if none);
    `dupes` = {ordinal: detail} of this shard's duplicate entries."""
    for ordinal, sample in enumerate(samples):
        key = sample["__key__"]
        row = {"key": key, "shard": shard, "ordinal": ordinal, "url": url_of(sample.get("json")),
               "ext": "", "data": None, "reason": "", "detail": ""}
        if labels:
            label = sample_label(sample)[0]
            row["label"] = -1 if label is None else int(label)
        problem = key_problem(key)
        if problem is not None:
            suffixes = [s for s in sample if not s.startswith("__")]
            row.update(key=safe_repr(key), reason="bad_key", detail=bad_key_detail(key, suffixes, problem))
        elif dupes and ordinal in dupes:
            row.update(reason="duplicate_key", detail=dupes[ordinal])
        else:
            picked = pick_image(sample)
            if picked is None:
                exts = sorted(s for s in sample if not s.startswith("__"))
                row.update(reason="no_image", detail=f"members: {', '.join(exts) or 'none'}")
            else:
                row["ext"], row["data"] = picked[0], bytes(picked[1])
        yield row


def make_datasource(paths: list[str], dupe_refs: dict, labels: bool = False):
    """A FileBasedDatasource over `paths`; `dupe_refs` = {shard: ObjectRef of {ordinal: detail}}; `labels`
    adds each entry's label (the distill feed of labelled shards)."""
    class PoolDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = ["tar"]

        def __init__(self, paths, dupe_refs):
            super().__init__(paths, file_extensions=["tar"])
            self.dupe_refs = dupe_refs
            self.columns = list(COLUMNS) + (["label"] if labels else [])

        def _read_stream(self, f, path: str):
            shard = shard_name(path)
            ref = self.dupe_refs.get(shard)
            dupes = ray.get(ref) if ref is not None else None
            chunk: list[dict] = []
            # A damaged tar raises ShardReadError after its complete entries: the read task fails and the
            # shard stays unfinished (as with Ray's own reader), never silently short.
            for row in entry_rows(iter_samples(path, fileobj=f), shard, dupes, labels):
                chunk.append(row)
                if len(chunk) >= ROWS_PER_CHUNK:
                    yield pd.DataFrame(chunk, columns=self.columns)
                    chunk = []
            if chunk:
                yield pd.DataFrame(chunk, columns=self.columns)

    return PoolDatasource(paths, dupe_refs)
