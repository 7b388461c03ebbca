"""The base of every config section: a pydantic model that rejects unknown keys (a typo is an error naming it).

Its own module so that stage configs (sample/config.py, distill/config.py, methods' options) and the top-level
`Config` (config.py) import it without importing each other.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def known_name(value: str, known, what: str) -> str:
    """`value` if it is one of `known` (a registry's names), else the ValueError a field validator raises."""
    names = list(known)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(names)}")
    return value
