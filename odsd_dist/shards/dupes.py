"""Duplicate keys across a pool, at any scale: a hash-partitioned map/reduce over (key, shard, ordinal).

Rule (docs/POOL.md): the first occurrence of a key in pool order wins — shards in the order they are
given (sorted by path when a folder is given), entries in tar order — and every later occurrence is a
duplicate (`duplicate_key`), in another shard or in the same one. Keys that fail `key_problem` are
quarantined as `bad_key` before and take no part.

Map (`partition_keys`): one shard's keys -> P tables, by a stable hash of the key. Reduce
(`reduce_partition`): the tables of one partition, from every shard -> its duplicates. No process holds
more than one shard's keys (map) or 1/P of the pool's keys (reduce); `odsd score` runs both as Ray
tasks (pool/dupes.py), `odsd shards verify` runs them in-process.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEYS_SCHEMA = pa.schema([("key", pa.string()), ("shard_idx", pa.int32()), ("ordinal", pa.int64())])
DUPES_SCHEMA = pa.schema([("shard", pa.string()), ("ordinal", pa.int64()), ("key", pa.string()),
                          ("first_shard", pa.string()), ("first_ordinal", pa.int64()), ("occurrences", pa.int64())])


def partition_of(key: str, partitions: int) -> int:
    """A stable hash partition (crc32: the same in every process, unlike hash())."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def partition_keys(shard_idx: int, keyed: Iterable[tuple[int, str]], partitions: int) -> list[pa.Table]:
    """Map: (ordinal, key) of one shard's valid keys -> `partitions` tables of (key, shard_idx, ordinal)."""
    cols: list[tuple[list, list]] = [([], []) for _ in range(partitions)]
    for ordinal, key in keyed:
        keys, ords = cols[partition_of(key, partitions)]
        keys.append(key)
        ords.append(ordinal)
    return [pa.table({"key": pa.array(k, pa.string()), "shard_idx": pa.array(np.full(len(k), shard_idx, np.int32)),
                      "ordinal": pa.array(o, pa.int64())}, schema=KEYS_SCHEMA) for k, o in cols]


def reduce_partition(parts: Sequence[pa.Table], shard_names: Sequence[str]) -> pa.Table:
    """Reduce: every occurrence after the first of each key in this partition (DUPES_SCHEMA rows)."""
    t = pa.concat_tables([p for p in parts if p.num_rows]) if any(p.num_rows for p in parts) else KEYS_SCHEMA.empty_table()
    if t.num_rows == 0:
        return DUPES_SCHEMA.empty_table()
    counts = t.group_by("key").aggregate([("key", "count")])
    repeated = counts.filter(pc.greater(counts.column("key_count"), 1))
    if repeated.num_rows == 0:
        return DUPES_SCHEMA.empty_table()
    t = t.filter(pc.is_in(t.column("key"), value_set=repeated.column("key")))
    t = t.sort_by([("key", "ascending"), ("shard_idx", "ascending"), ("ordinal", "ascending")])
    keys = t.column("key").to_pylist()
    sidx = t.column("shard_idx").to_numpy()
    ords = t.column("ordinal").to_numpy()
    n_of = dict(zip(repeated.column("key").to_pylist(), repeated.column("key_count").to_pylist()))
    rows: dict[str, list] = {n: [] for n in DUPES_SCHEMA.names}
    first = None
    for i, key in enumerate(keys):
        if i == 0 or key != keys[i - 1]:
            first = i
            continue
        rows["shard"].append(shard_names[sidx[i]])
        rows["ordinal"].append(int(ords[i]))
        rows["key"].append(key)
        rows["first_shard"].append(shard_names[sidx[first]])
        rows["first_ordinal"].append(int(ords[first]))
        rows["occurrences"].append(int(n_of[key]))
    return pa.table(rows, schema=DUPES_SCHEMA)


def combine(tables: Sequence[pa.Table], shard_names: Sequence[str]) -> pa.Table:
    """The reducers' outputs as one table in pool order (shard order, then ordinal)."""
    t = pa.concat_tables(list(tables)) if tables else DUPES_SCHEMA.empty_table()
    order = {n: i for i, n in enumerate(shard_names)}
    idx = pa.array([order[s] for s in t.column("shard").to_pylist()], pa.int64())
    t = t.append_column("_o", idx).sort_by([("_o", "ascending"), ("ordinal", "ascending")])
    return t.drop_columns(["_o"])


def detail(row: dict) -> str:
    """The quarantine detail of one duplicate occurrence."""
    return (f"key seen {row['occurrences']}x in the pool; first occurrence kept: shard {row['first_shard']} "
            f"entry {row['first_ordinal']}")


def find_duplicates_local(shard_keys: Sequence[Sequence[tuple[int, str]]], shard_names: Sequence[str],
                          partitions: int = 16) -> pa.Table:
    """Map and reduce in this process (odsd shards verify, tests); `shard_keys[i]` = [(ordinal, key)] of shard i."""
    maps = [partition_keys(i, keys, partitions) for i, keys in enumerate(shard_keys)]
    return combine([reduce_partition([m[j] for m in maps], shard_names) for j in range(partitions)], shard_names)
