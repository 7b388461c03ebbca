"""Every stage, by the command that runs it. Each is declared once, as the `STAGE` at the end of its own
module (a `runner.Stage`: inputs, plan, run, output, summary, whether it needs Ray)."""
from __future__ import annotations

from . import distill, evaluate, sample, score, teacher
from .runner import Stage

STAGES: dict[str, Stage] = {s.command: s for s in (teacher.STAGE, score.STAGE, sample.STAGE, distill.STAGE,
                                                     evaluate.STAGE)}
