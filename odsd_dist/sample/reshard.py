"""Write the selected pool images as new training shards (`sample.reshard`).

One output shard per source shard that has selected keys: `<out>/<shard>.tar` with the selected
samples' members copied byte for byte (original keys, so the selection table still joins) and a
`<shard>.parquet` sidecar with the selection rows of that shard. One Ray task per source shard;
tars are read as bytes (shards.tario), nothing is decoded or unpickled; written by the one tar writer
(shards.writer: atomic, fixed headers), so reruns give identical files.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..errors import UserError
from ..shards.tario import expand_shards, iter_samples, shard_name
from ..shards.writer import TarWriter
from ..tables import write_table

# Resharded tars have always carried mtime 0 (the pool builder's are 1700000000): kept, so that a
# selection resharded before and after the shared writer gives the same bytes.
RESHARD_MTIME = 0


def resolve_sources(patterns: list[str]) -> dict[str, str]:
    """{shard name: tar path} of the pool shards; UserError naming the key if there are none."""
    if not patterns:
        raise UserError("sample.reshard is set but neither sample.pool_shards nor score.shards names the pool tars")
    return {shard_name(p): p for p in expand_shards(list(patterns))}


def _reshard_one(src: str, keys: list[str], rows: pa.Table, out: str) -> dict:
    want = set(keys)
    out_path = Path(out)
    found: list[str] = []
    errors: list = []
    with TarWriter(out_path, mtime=RESHARD_MTIME) as tar:
        for sample in iter_samples(src, errors=errors):
            key = sample["__key__"]
            if key not in want:
                continue
            tar.add_sample(sample)
            found.append(key)
            want.discard(key)  # a key repeated later in the tar: the first occurrence only (docs/POOL.md)
    write_table(rows, out_path.with_suffix(".parquet"))
    return {"shard": out_path.name, "selected": len(keys), "written": len(found), "tar_errors": errors}


def reshard(selection: pa.Table, sources: dict[str, str], out: Path) -> dict:
    """Reshard the selection; returns {"folder", "shards", "written", "missing"}."""
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted(set(selection.column("shard").to_pylist()))
    missing_src = [s for s in shards if s not in sources]
    if missing_src:
        raise UserError(f"sample.reshard: no pool tar for shard(s) {missing_src[:5]} among sample.pool_shards/score.shards")
    task = ray.remote(num_cpus=1)(_reshard_one)
    refs = []
    for s in shards:
        rows = selection.filter(pc.equal(selection.column("shard"), s)).sort_by("key")
        refs.append(task.remote(sources[s], rows.column("key").to_pylist(), rows, str(out / f"{s}.tar")))
    results = ray.get(refs)
    written = sum(r["written"] for r in results)
    return {"folder": str(out), "shards": len(results), "written": written, "missing": selection.num_rows - written,
            "tar_errors": sum(len(r["tar_errors"]) for r in results)}
