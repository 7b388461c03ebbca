"""The ledger: every finished run's record, kept in the repository, so a full run spans sessions.

A run's working folder (`<out>/runs/...`: checkpoints, students, caches) lives on one machine and is gone
with it; a full benchmark takes longer than one session. So each finished run's record (val curve, test
top-1, timings) is also written, as one small JSON file, into the ledger folder (committed), and a rerun
takes a run from there instead of training it again when its key matches.

The key is what decides the result: the benchmark mode, the base odsd config, the split settings, the
row's values, the tuned values, the seed, the teacher's sha256 and the *content* of every input file (the
data splits' and the pool's sha256), never paths' mtimes: a rebuilt data folder with the same bytes keeps
the ledger valid, changed bytes invalidate it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from odsd_dist.distill.config import RUNTIME_KEYS
from odsd_dist.stage import fingerprint, sha256_file
from odsd_dist.tables import atomic_write_json

# base-config keys that change how a run executes or where it writes, not what it computes (distill's are
# the ones its own stage fingerprint leaves out, plus where and how often it checkpoints)
_VOLATILE = {"distill": (*RUNTIME_KEYS, "out", "checkpoint_every"),
             "score": ("out", "actors", "batch_size"), "sample": ("out",), "eval": ("out", "batch_size"),
             "ray": None}


def content_digest(paths: list[str]) -> str:
    """sha256 over the sorted (file name, sha256 of its bytes) of `paths`: names and bytes, not mtimes."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: Path(q).name):
        h.update(f"{Path(p).name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def stable_base(base: dict) -> dict:
    """The base odsd config without the keys in `_VOLATILE` (a section named with None goes whole)."""
    out = {}
    for sec, val in base.items():
        drop = _VOLATILE.get(sec, ())
        if drop is None:
            continue
        out[sec] = {k: v for k, v in val.items() if k not in drop} if isinstance(val, dict) else val
    return out


class Ledger:
    """One JSON file per finished run under `folder/<row>/<run id>-s<seed>.json`, holding its key."""

    def __init__(self, folder: Optional[str], setup_key: dict, commit: Optional[str] = None):
        self.folder = Path(folder) if folder else None
        self.setup_key = setup_key
        self.commit = commit

    def key(self, row, extra: dict, seed: int) -> str:
        return fingerprint({**self.setup_key, "row": row.name, "source": row.source, "set": row.set,
                            "extra": extra, "seed": seed})

    def _path(self, row_name: str, run_id: str, seed: int) -> Path:
        return self.folder / row_name / f"{run_id}-s{seed}.json"

    def get(self, row, run_id: str, extra: dict, seed: int) -> Optional[dict]:
        """The finished record of this run, or None (no ledger, no file, another key, or no test result)."""
        if self.folder is None:
            return None
        try:
            doc = json.loads(self._path(row.name, run_id, seed).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if doc.get("key") != self.key(row, extra, seed) or "test" not in (doc.get("record") or {}):
            return None
        return {**doc["record"], "ledger": {"commit": doc.get("commit"), "finished_at": doc.get("finished_at")}}

    def put(self, row, run_id: str, extra: dict, seed: int, rec: dict) -> None:
        if self.folder is None:
            return
        atomic_write_json(self._path(row.name, run_id, seed),
                          {"key": self.key(row, extra, seed), "commit": self.commit,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "record": rec})


def records(folder: str) -> list[dict]:
    """Every record in a ledger folder, as stored ({key, commit, finished_at, record}), by row and file name."""
    out = []
    for path in sorted(Path(folder).glob("*/*.json")):
        try:
            out.append({"file": f"{path.parent.name}/{path.name}", **json.loads(path.read_text())})
        except json.JSONDecodeError:
            out.append({"file": f"{path.parent.name}/{path.name}", "record": None})
    return out


def markdown_table(folder: str) -> str:
    """One line per finished run in the ledger: what a stopped full run has measured so far, before its rows
    are complete (quality.md lists a row once all its seeds are done)."""
    docs = records(folder)
    lines = [f"{len(docs)} runs in {folder}", "",
             "| row | seed | settings | val top-1 % (last) | test top-1 % (last) | wall s | samples/s | commit | finished |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for doc in sorted(docs, key=lambda d: (d["file"].split("/")[0], d.get("finished_at") or "")):
        r = doc.get("record")
        if not r:
            lines.append(f"| {doc['file']} (unreadable) | | | | | | | | |")
            continue
        pct = lambda v: "–" if v is None else f"{100 * v:.2f}"
        extra = [o for o in r.get("overrides") or [] if o.startswith(("distill.lr", "distill.steps"))]
        lines.append(f"| {r['row']} | {r['seed']} | {' '.join(extra) or '–'} | {pct(r['val']['last'])} | "
                     f"{pct((r.get('test') or {}).get('last'))} | {r.get('wall_s', '–')} | "
                     f"{(r.get('distill') or {}).get('samples_per_s') or '–'} | {doc.get('commit') or '–'} | "
                     f"{doc.get('finished_at') or '–'} |")
    return "\n".join(lines)
