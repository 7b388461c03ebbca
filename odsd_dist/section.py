"""The base of every config section: a pydantic model that rejects unknown keys (a typo is an error naming it).

Its own module so that stage configs (sample/config.py, distill/config.py, methods' options) and the top-level
`Config` (config.py) import it without importing each other.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
