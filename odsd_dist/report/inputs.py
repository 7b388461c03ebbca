"""The report's input tables: selections (a file or a sample folder) and the provenance table."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..tables import read_meta


def selection_path(p: str) -> Path:
    """selection.parquet itself, or the one inside a sample folder; UserError if there is none."""
    path = Path(p)
    if path.is_dir():
        path = path / "selection.parquet"
    if not path.is_file():
        raise UserError(f"selection not found: {p}")
    return path


def read_selection(path: Path) -> tuple[pa.Table, dict]:
    """(key, pred, score, weight) of a selection table and its odsd metadata."""
    try:
        t = pq.read_table(path, columns=["key", "pred", "score", "weight"])
    except Exception as e:
        raise UserError(f"selection {path}: not a selection table ({e.__class__.__name__}: {e})") from None
    return t, read_meta(path)


def read_provenance(path: str) -> pa.Table:
    """(key, source, source_class) of a provenance table (reports only, never a pipeline input)."""
    if not Path(path).is_file():
        raise UserError(f"--provenance: not found: {path}")
    try:
        return pq.read_table(path, columns=["key", "source", "source_class"])
    except Exception as e:  # not Parquet, or lacking a column
        raise UserError(f"--provenance {path}: not a provenance table with key, source, source_class "
                        f"({e.__class__.__name__}: {e})") from None
