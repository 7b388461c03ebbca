"""One lifecycle for every stage: validate, skip when done, Ray up, run, done.json last, metrics, summary.

A stage is declared once, as a `Stage` at the end of its own module (`stages.py` lists them all); its
entry point is a function from its inputs to its output, e.g. `sample(scores, cfg)`, which is
`run_stage(STAGE, cfg, scores)`. `odsd run` chains those functions, each stage's output the next one's
input; a stage run on its own (`odsd sample`) takes the inputs its config names (`Stage.inputs`).

What every stage gets from here rather than writing it again:
- validation first (`Stage.plan`: UserError naming the key, exit 2), with no Ray and nothing written;
- a finished stage (done.json matches the fingerprint of config and inputs) is skipped with one line;
- Ray is started only for a stage that needs it, after the skip check;
- done.json is written only after the run returned, so a folder without it is never a finished result
  (an error or a kill leaves the last done.json removed and the stage resumable);
- metrics and the printed summary come after done.json, through one hook each;
- everything after validation (the skip check, Ray's start, the run, metrics, summary) in the stage's log
  file `<out>/logs/<Stage.log>.log` (console.py: quiet console, Ray's own output there), whichever way the
  stage is run: the CLI, `odsd run`, or a caller of the stage function (bench/quality).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .console import say, stage_log, to_log
from .raytools import init_ray
from .stage import StageOutput


@dataclass
class Plan:
    """What a stage's validation found: where it writes, what identifies its result, what its run needs."""

    folder: Path
    config: dict  # the config part of the fingerprint (and of done.json)
    inputs: dict  # the input identities of the fingerprint (and of done.json)
    work: Any = None  # the stage's own: whatever its run function needs from the validation


@dataclass(frozen=True)
class Result:
    """A stage's outcome: `output` is what the next stage takes (a path, or eval's record)."""

    output: Any
    summary: dict
    skipped: bool = False


def _same(report: dict) -> dict:
    return report


def without(*keys: str) -> Callable[[dict], dict]:
    """A `Stage.stored` that keeps a report's keys but `keys` (what is printed but not kept in done.json)."""
    return lambda report: {k: v for k, v in report.items() if k not in keys}


def _stored_summary(plan: Plan, rec: dict) -> Optional[dict]:
    return rec["summary"]


@dataclass(frozen=True)
class Stage:
    """A stage, declared once. `cfg` is the loaded `config.Config` throughout."""

    name: str  # done.json's "stage"
    command: str  # how the CLI names it ("teacher train")
    inputs: Callable[..., tuple]  # cfg -> the inputs its config names, for a stage run on its own
    plan: Callable[..., Plan]  # (cfg, *inputs) -> Plan; raises UserError; starts no Ray, writes nothing
    run: Callable[..., dict]  # (cfg, plan, out: StageOutput) -> the report (returned and printed)
    output: Callable[[Plan, dict], Any]  # (plan, report) -> the stage's output
    print_summary: Callable[[dict], None]  # report -> the one-screen summary
    needs_ray: bool = False
    stored: Callable[[dict], dict] = _same  # report -> done.json's summary
    # (plan, done.json record) -> the report of a skipped run, or None when the record is not enough
    # (eval.json or the teacher's weights gone)
    reuse: Callable[[Plan, dict], Optional[dict]] = _stored_summary
    metrics: Optional[Callable[[dict], None]] = None  # report -> exported metrics

    @property
    def log(self) -> str:
        """The name of its log file in `<out>/logs/`: the command's first word (teacher train -> teacher)."""
        return self.command.split()[0]


def run_stage(stage: Stage, cfg, *inputs) -> Result:
    """Run `stage` on `inputs` (see the module docstring for the lifecycle)."""
    plan = stage.plan(cfg, *inputs)
    with stage_log(cfg.out, stage.log):
        return _run_planned(stage, cfg, plan)


def _run_planned(stage: Stage, cfg, plan: Plan) -> Result:
    out = StageOutput(plan.folder, stage.name, plan.config, plan.inputs)
    rec = out.done()
    report = stage.reuse(plan, rec) if rec is not None else None
    if report is not None:
        line = (f"odsd {stage.command}: {plan.folder} is up to date (done.json matches its inputs and config); "
                "nothing to do")
        print(line, flush=True)
        to_log(line)
        return Result(stage.output(plan, report), report, skipped=True)
    out.start(cfg.to_dict())
    if stage.needs_ray:
        init_ray(cfg.ray)
    report = stage.run(cfg, plan, out)
    out.finish(stage.stored(report))
    if stage.metrics is not None:
        try:
            stage.metrics(report)
        except Exception as e:  # metrics never fail a finished stage
            say(f"odsd {stage.command}: metrics not exported ({e})")
    stage.print_summary(report)
    return Result(stage.output(plan, report), report)


def run_configured(stage: Stage, cfg) -> dict:
    """The stage on the inputs its config names; its report (the CLI's and the `run_<stage>(cfg)` callers')."""
    return run_stage(stage, cfg, *stage.inputs(cfg)).summary
