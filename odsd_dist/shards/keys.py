"""Sample keys are identifiers, never paths: the check every reader applies before a key is used.

A key comes from a tar member name (`KEY.ext`), so a hostile or sloppy tar can hand us `../../x`,
`/etc/x`, `a\\nb` or a 10 kB name. Any stage or tool that names a file after a key (resharding, an
export, extracting output tars) would then write outside its folder, so such a key is quarantined as
`bad_key` and never used; its quarantine row carries the key escaped (`safe_repr`), not raw.
"""
from __future__ import annotations

from typing import Iterable, Optional

MAX_KEY_CHARS = 200  # img2dataset keys are 9 digits; 200 leaves room for URL hashes and prefixes


def key_problem(key) -> Optional[str]:
    """Why `key` is not a plain name (empty, too long, path separator, '.'/'..', control or undecodable
    characters), or None when it is fine."""
    if not isinstance(key, str):
        return f"not a string ({type(key).__name__})"
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"{len(key)} characters > {MAX_KEY_CHARS}"
    if "/" in key or "\\" in key:
        return "contains a path separator"
    if key in (".", "..") or key.startswith(".."):
        return "is or starts with '..'"
    for ch in key:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            return f"contains control character U+{o:04X}"
        if 0xD800 <= o < 0xE000:  # a byte that was not UTF-8 (surrogateescape) or a lone surrogate
            return "contains bytes that are not UTF-8"
    return None


def safe_repr(text: str, limit: int = 240) -> str:
    """`text` with every non-printable or non-ASCII character escaped (so it can go into a table or a log
    as plain data), cut to `limit` characters."""
    out = text.encode("ascii", "backslashreplace").decode("ascii") if isinstance(text, str) else repr(text)
    out = "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def bad_key_detail(key: str, suffixes: Iterable[str], problem: str) -> str:
    """The quarantine detail of a bad key: what is wrong and the member names it came from (escaped)."""
    names = ", ".join(safe_repr(f"{key}.{s}", 120) for s in sorted(suffixes))
    return f"{problem}; members: {names}"
