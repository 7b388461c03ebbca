"""The base of every config section: a pydantic model that rejects unknown keys (a typo is an error naming it),
and the `--set a.b=c` override parser every config loader shares (odsd's and bench/quality's).

Its own module so that stage configs (<stage>/config.py, methods' options) and the top-level `Config`
(config.py) import it without importing each other.
"""
from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def known_name(value: str, known, what: str) -> str:
    """`value` if it is one of `known` (a registry's names), else the ValueError a field validator raises."""
    names = list(known)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(names)}")
    return value


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b] = value for 'a.b' (sections created on the way; a non-section on the way is a UserError)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml-typed c)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: value is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"config error: {loc or '<root>'}: {e['msg']}")
    return "\n".join(lines)
