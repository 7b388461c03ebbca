"""Input paths: globs and folders expanded to sorted, de-duplicated file lists."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from .errors import UserError


def expand_paths(patterns: list[str], key: str, suffix: str = ".tar") -> list[str]:
    """Expand globs/dirs into a sorted list of files; a pattern that matches nothing is a UserError naming `key`."""
    out: list[str] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            matches = sorted(str(x) for x in p.iterdir() if x.name.endswith(suffix))
        else:
            matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if p.is_file() else [])
        if not matches:
            raise UserError(f"{key}: no {suffix} files at {pat!r}")
        out.extend(matches)
    if not out:
        raise UserError(f"{key}: no input paths given")
    seen, unique = set(), []
    for m in out:
        a = os.path.abspath(m)
        if a not in seen:
            seen.add(a)
            unique.append(a)
    return unique
