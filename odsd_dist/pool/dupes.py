"""The duplicate-key pass of `odsd score`, on Ray: map tasks over groups of shards, reduce tasks per hash
partition (shards/dupes.py has the rule and the pure functions). Its result, one table of duplicate
entries, is written once into the stage folder and reused by reruns over the same inputs.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..shards import dupes as D
from ..shards.keys import key_problem
from ..shards.tario import iter_samples
from ..tables import read_meta, write_table

MAX_MAP_TASKS = 256  # map outputs = map tasks x partitions Ray objects: keep that bounded
MAX_PARTITIONS = 64  # a reducer holds 1/partitions of the pool's keys


def _shard_keys(path: str) -> list[tuple[int, str]]:
    return [(i, s["__key__"]) for i, s in enumerate(iter_samples(path, errors=[])) if key_problem(s["__key__"]) is None]


def _map(first_idx: int, paths: list[str], partitions: int):
    parts = [D.partition_keys(first_idx + j, _shard_keys(p), partitions) for j, p in enumerate(paths)]
    out = [pa.concat_tables([m[q] for m in parts]) for q in range(partitions)]
    return out if partitions > 1 else out[0]  # Ray: num_returns=1 is one object, not a list of one


def find_duplicates(names: list[str], paths: list[str], cpus: float = 1.0) -> pa.Table:
    """DUPES_SCHEMA rows of the whole pool (`names[i]` is the shard of `paths[i]`, in pool order)."""
    group = max(1, math.ceil(len(paths) / MAX_MAP_TASKS))
    starts = list(range(0, len(paths), group))
    partitions = max(1, min(MAX_PARTITIONS, len(starts)))
    mapper = ray.remote(num_cpus=cpus, num_returns=partitions)(_map)
    outs = []
    for s in starts:
        refs = mapper.remote(s, paths[s:s + group], partitions)
        outs.append(refs if partitions > 1 else [refs])
    reducer = ray.remote(num_cpus=cpus)(lambda names, *parts: D.reduce_partition(parts, names))
    names_ref = ray.put(list(names))
    reduced = ray.get([reducer.remote(names_ref, *[o[q] for o in outs]) for q in range(partitions)])
    return D.combine(reduced, names)


def inputs_digest(names: list[str], identities: dict) -> str:
    """What the duplicate table depends on: the shards, in order, and their contents' identities."""
    return hashlib.sha256(json.dumps([[n, identities[n]] for n in names], sort_keys=True, default=str).encode()).hexdigest()


def load_or_find(path: Path, names: list[str], paths: list[str], identities: dict, cpus: float) -> pa.Table:
    """The pool's duplicate table: read from `path` if it was made for these inputs, else computed and written."""
    digest = inputs_digest(names, identities)
    if path.is_file():
        try:
            if read_meta(path).get("inputs") == digest:
                return pq.read_table(path)
        except Exception:  # unreadable: recompute, the write below replaces it
            pass
    table = find_duplicates(names, paths, cpus)
    write_table(table, path, {"stage": "score", "what": "duplicate keys", "inputs": digest})
    return table


def per_shard(table: pa.Table) -> dict[str, dict[int, str]]:
    """{shard: {ordinal: quarantine detail}} of the duplicate entries."""
    out: dict[str, dict[int, str]] = {}
    for row in table.to_pylist():
        out.setdefault(row["shard"], {})[row["ordinal"]] = D.detail(row)
    return out


def shard_digest(entries: Optional[dict]) -> str:
    """A short digest of one shard's duplicate entries (in its ledger record: a changed pool reruns it)."""
    return hashlib.sha256(json.dumps(sorted((entries or {}).items())).encode()).hexdigest()[:16]
