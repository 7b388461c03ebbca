"""Driver side of scoring: assemble the ordered scorer output into one score and one quarantine
table per input shard, write both atomically, then record the shard in the ledger.

The pipeline runs with `preserve_order`, so a shard is complete the moment a row of the next
shard (or the end of the stream) arrives. Memory is one shard's rows, never the pool.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..tables import QUARANTINE_SCHEMA, Ledger, score_schema, write_table


class ShardAssembler:
    def __init__(self, folder: Path, ledger: Ledger, feature_dim: int, meta: dict, identities: dict,
                 on_shard_done: Optional[Callable[[str, dict], None]] = None, dupe_digests: Optional[dict] = None):
        self.folder = folder
        self.ledger = ledger
        self.schema = score_schema(feature_dim)
        self.meta = meta
        self.identities = identities
        self.on_shard_done = on_shard_done
        self.dupe_digests = dupe_digests or {}
        self.current: Optional[str] = None
        self.parts: list[pa.Table] = []
        self.t_start = time.perf_counter()
        self.finished: list[str] = []

    def add(self, table: pa.Table) -> None:
        """Feed one batch of scorer output (rows in shard order)."""
        if table.num_rows == 0:
            return
        shards = table.column("shard")
        # Split the batch at shard boundaries, preserving order.
        change = pc.not_equal(shards.slice(1), shards.slice(0, len(shards) - 1)).to_numpy(zero_copy_only=False)
        bounds = [0] + [i + 1 for i, c in enumerate(change) if c] + [table.num_rows]
        for a, b in zip(bounds[:-1], bounds[1:]):
            piece = table.slice(a, b - a)
            shard = piece.column("shard")[0].as_py()
            if shard != self.current:
                if shard in self.finished:
                    raise RuntimeError(f"rows of shard {shard} arrived after it was written: pipeline order broken")
                self.flush()
                self.current = shard
            self.parts.append(piece)

    def flush(self) -> Optional[dict]:
        """Write the current shard's tables and mark it finished."""
        if self.current is None:
            return None
        shard, parts = self.current, self.parts
        self.current, self.parts = None, []
        t = pa.concat_tables(parts)
        bad = pc.not_equal(t.column("reason"), "")
        scores = t.filter(pc.invert(bad)).select(self.schema.names).cast(self.schema)
        quarantine = t.filter(bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
        meta = {**self.meta, "shard": shard}
        write_table(scores, self.folder / "scores" / f"{shard}.parquet", meta)
        write_table(quarantine, self.folder / "quarantine" / f"{shard}.parquet", meta)
        reasons = {}
        for r in quarantine.column("reason").to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        info = {"rows": scores.num_rows, "quarantined": quarantine.num_rows, "reasons": reasons,
                "input": self.identities.get(shard), "dupes": self.dupe_digests.get(shard)}
        self.ledger.mark(shard, info)
        self.finished.append(shard)
        if self.on_shard_done:
            self.on_shard_done(shard, info)
        return info

    def close(self) -> None:
        self.flush()
