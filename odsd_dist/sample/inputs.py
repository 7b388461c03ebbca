"""Opening a score directory for sampling: every check that can fail runs here, before any Ray work.

Reads only Parquet footers: the file list, each file's schema against `score_schema(d)`, the row
counts and the table metadata (classes, teacher identity, feature dimension).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..stage import file_identity
from ..tables import META_KEY, score_schema

import json


@dataclass
class ScoreInput:
    folder: Path
    files: list[str]
    rows: int
    num_classes: int
    class_names: list[str]
    feature_dim: int
    teacher_sha256: str
    meta: dict = field(default_factory=dict)
    file_rows: list[int] = field(default_factory=list)

    def identity(self) -> list[dict]:
        return [file_identity(f) for f in self.files]


def _same_fields(a: pa.Schema, b: pa.Schema) -> bool:
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def open_scores(folder, require_done: bool = True) -> ScoreInput:
    """Validate a score dir (scores/<shard>.parquet + done.json); UserError naming the path otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"score dir not found: {folder} (run `odsd score` first or set sample.scores)")
    if require_done and not (folder / "done.json").is_file():
        raise UserError(f"score dir {folder} has no done.json: the score stage did not finish")
    sdir = folder / "scores"
    files = sorted(str(p) for p in sdir.glob("*.parquet")) if sdir.is_dir() else []
    if not files:
        raise UserError(f"score dir {folder}: no score tables in {sdir}")
    rows, file_rows, meta0 = 0, [], None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise UserError(f"score table {f}: not a readable Parquet file ({e.__class__.__name__}: {e})") from None
        schema = pf.schema_arrow
        raw = (schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
        d = meta.get("feature_dim")
        if not isinstance(d, int) or not isinstance(meta.get("num_classes"), int):
            raise UserError(f"score table {f}: metadata lacks feature_dim/num_classes (not written by `odsd score`)")
        if not _same_fields(schema, score_schema(d)):
            want = ", ".join(f"{x.name}: {x.type}" for x in score_schema(d))
            raise UserError(f"score table {f}: wrong schema; expected columns {want}")
        if meta0 is None:
            meta0 = meta
        elif (meta.get("num_classes"), meta.get("feature_dim"), meta.get("teacher_sha256")) != (
            meta0.get("num_classes"), meta0.get("feature_dim"), meta0.get("teacher_sha256")):
            raise UserError(f"score table {f}: num_classes/feature_dim/teacher differ from {files[0]}")
        n = pf.metadata.num_rows
        file_rows.append(n)
        rows += n
    if rows == 0:
        raise UserError(f"score dir {folder}: the score tables hold no rows")
    c = int(meta0["num_classes"])
    names = list(meta0.get("class_names") or [str(i) for i in range(c)])
    if len(names) != c:
        raise UserError(f"score table {files[0]}: {len(names)} class_names for num_classes={c}")
    return ScoreInput(folder=folder, files=files, rows=rows, num_classes=c, class_names=names,
                      feature_dim=int(meta0["feature_dim"]), teacher_sha256=str(meta0.get("teacher_sha256")),
                      meta=meta0, file_rows=file_rows)
