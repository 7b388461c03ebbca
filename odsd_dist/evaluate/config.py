"""The `eval` config section: the labelled test shards and the batch size."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..section import Section


class EvalConfig(Section):
    shards: list[str] = Field(default_factory=list)  # labelled original-domain shards (test split)
    batch_size: int = Field(256, ge=1)
    out: Optional[str] = None
