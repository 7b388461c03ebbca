"""Stage output folders: resolved config, fingerprint of inputs + config, and done.json written last.

A stage whose done.json matches its fingerprint is skipped on rerun; a folder without it is never
read as a finished result.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .tables import atomic_write_bytes, atomic_write_json


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (config section + input identities)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file: absolute path, size and mtime."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class StageOutput:
    """One stage's output folder."""

    def __init__(self, folder: str | os.PathLike, stage: str, config: dict, inputs: dict):
        self.folder = Path(folder)
        self.stage = stage
        self.config = config
        self.inputs = inputs
        self.fingerprint = fingerprint({"stage": stage, "config": config, "inputs": inputs})

    @property
    def done_path(self) -> Path:
        return self.folder / "done.json"

    def done(self) -> Optional[dict]:
        """The done.json record if this exact stage (config + inputs) already finished, else None."""
        try:
            rec = json.loads(self.done_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return rec if rec.get("fingerprint") == self.fingerprint else None

    def start(self, full_config: Optional[dict] = None) -> None:
        """Create the folder, drop a stale done.json and write the resolved config."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.done_path.exists():
            self.done_path.unlink()
        doc = full_config if full_config is not None else {self.stage: self.config}
        atomic_write_bytes(self.folder / "config.yaml", yaml.safe_dump(doc, sort_keys=False).encode())

    def finish(self, summary: dict) -> dict:
        rec = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary,
        }
        atomic_write_json(self.done_path, rec)
        return rec
