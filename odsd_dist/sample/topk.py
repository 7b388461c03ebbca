"""Streaming per-class top-k with a total order (rank descending, then key ascending).

Each block keeps, per class, its own top-q rows (np.argpartition for the threshold, keys only to
break ties at the boundary); the driver merges block results into a buffer and prunes it the same
way whenever it grows past ~2N rows. The top-q of a union is the top-q of the union of top-q's under
a total order, so the result is exact and independent of block boundaries and arrival order, and
memory is O(N + block), never O(pool).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CLS = "_cls"  # int32 bucket (teacher class, or 0 for a global top-N)
RANK = "_rank"  # float64: larger is better
SELECTION_ORDER = [("pred", "ascending"), ("key", "ascending")]  # the selection table's row order


def _keys_np(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)


def topq_indices(rank: np.ndarray, keys: pa.Array | pa.ChunkedArray, q: int, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices (into `rank`) of the q best rows among `rows` (default all): rank desc, key asc."""
    if rows is None:
        rows = np.arange(len(rank))
    if q <= 0 or len(rows) == 0:
        return rows[:0]
    if len(rows) <= q:
        return rows
    r = rank[rows]
    part = np.argpartition(-r, q - 1)
    thr = r[part[q - 1]]  # the q-th best rank value
    better = rows[r > thr]
    tied = rows[r == thr]
    need = q - len(better)
    if len(tied) > need:  # resolve the boundary by key (deterministic, order independent)
        tk = _keys_np(keys.take(pa.array(tied)))
        tied = tied[np.argsort(tk, kind="stable")[:need]]
    return np.concatenate([better, tied])


def per_class_topq(table: pa.Table, quotas: np.ndarray) -> pa.Table:
    """Rows of `table` (with CLS, RANK, key columns) in their class's top-quota; others dropped."""
    idx = per_class_topq_indices(table, quotas)
    return table if idx is None else table.take(pa.array(idx))


def per_class_topq_indices(table: pa.Table, quotas: np.ndarray) -> Optional[np.ndarray]:
    """Sorted indices of the rows per_class_topq keeps, or None when it keeps them all."""
    n = table.num_rows
    if n == 0:
        return None
    cls = table.column(CLS).to_numpy()
    rank = table.column(RANK).to_numpy()
    keys = table.column("key")
    counts = np.bincount(cls, minlength=len(quotas))
    if np.all(counts[: len(quotas)] <= quotas) and len(counts) == len(quotas):
        return None
    order = np.argsort(cls, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    keep = []
    for k in np.nonzero(counts)[0]:
        rows = order[bounds[k]: bounds[k + 1]]
        q = int(quotas[k]) if k < len(quotas) else 0
        keep.append(topq_indices(rank, keys, q, rows) if len(rows) > q else rows)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class TopKMerger:
    """Driver-side merge of block candidates: bounded buffer, pruned to the per-class top-quota."""

    def __init__(self, quotas: np.ndarray, slack: float = 1.0, min_buffer: int = 65_536):
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self.limit = max(min_buffer, int((1 + slack) * int(self.quotas.sum())))
        self.parts: list[pa.Table] = []
        self.rows = 0
        self.peak_rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.parts.append(table)
        self.rows += table.num_rows
        self.peak_rows = max(self.peak_rows, self.rows)
        if self.rows > self.limit:
            self._prune()

    def _prune(self) -> None:
        if not self.parts:
            return
        # chunked (zero-copy) concat; only the kept rows are copied, by the take in per_class_topq
        t = pa.concat_tables(self.parts, promote_options="none")
        t = per_class_topq(t, self.quotas)
        self.parts = [t]
        self.rows = t.num_rows
        pa.default_memory_pool().release_unused()  # hand the dropped rows' pages back to the OS

    def result(self, schema: Optional[pa.Schema] = None, sort_keys: Optional[list] = None) -> pa.Table:
        """The merged top-quota rows, sorted by `sort_keys` (default: class, rank desc, key).

        The kept rows are copied out in buffer order first (a sequential take, faster than a random-order
        take straight from the ~100-chunk buffer: docs/BENCHMARKS.md, design notes), the buffer is let go,
        then they are put in order: at most the buffer and one copy, or two copies, are held at once."""
        if not self.parts:
            if schema is None:
                raise ValueError("no candidates and no schema")
            return schema.empty_table()
        t = pa.concat_tables(self.parts, promote_options="none")
        self.parts = []
        idx = per_class_topq_indices(t, self.quotas)
        kept = (t if idx is None else t.take(pa.array(idx))).combine_chunks()
        del t
        pa.default_memory_pool().release_unused()
        keys = sort_keys or [(CLS, "ascending"), (RANK, "descending"), ("key", "ascending")]
        order = pc.sort_indices(kept.select([k for k, _ in keys]), sort_keys=keys)
        return kept.take(order)


def with_rank(table: pa.Table, cls: np.ndarray, rank: np.ndarray) -> pa.Table:
    return table.append_column(CLS, pa.array(cls.astype(np.int32))).append_column(RANK, pa.array(rank.astype(np.float64)))


def drop_rank(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in (CLS, RANK) if c in table.column_names])


def is_selected(keys: pa.Array | pa.ChunkedArray, selected: pa.Array) -> np.ndarray:
    """Boolean mask: which keys are in the selected key set (an Arrow hash lookup, O(batch))."""
    return pc.is_in(keys, value_set=selected).to_numpy(zero_copy_only=False)
