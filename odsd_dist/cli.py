"""The `odsd` command line: parse arguments, load and validate the config, call one stage.

Errors a user can fix (bad config key, missing path, malformed table) print one message and exit 2,
before any Ray work starts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

# The commands import what they run inside their handlers: `odsd --help` and a usage error answer in
# 0.06 s, where importing the config (torch, Ray) first takes ~3 s (python -X importtime, 2026-11-30).

EPILOG = """examples:
  odsd run                                  # the demo, end to end, on the embedded config
  odsd score --config my.yaml --set score.actors=4
  odsd sample --config my.yaml --set sample.n=30000
  odsd shards verify shards/demo/pool/*.tar --json
  odsd teacher train --config my.yaml
"""


VERBOSE_HELP = ("also print Ray's, Ray Data's, Ray Train's and DeepSpeed's own log lines and progress output "
                "(same as ODSD_VERBOSE=1); they always go to <out>/logs/<stage>.log")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--config", "-c", help="YAML config (default: the embedded demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set score.batch_size=128 (repeatable)")


def _config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _print_summary(summary: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(summary, indent=1, sort_keys=True, default=str))


def cmd_stage(args):
    """A stage (score, sample, distill, eval, teacher train) on the inputs its config names."""
    if getattr(args, "reshard", None):
        args.overrides.append(f"sample.reshard={args.reshard}")
    cfg = _config(args)
    # Imported here rather than at the top, and after the config is loaded: the stage modules import Ray,
    # Ray Data and torch (seconds), which `odsd --help`, `odsd shards verify` and a config error do not need.
    from .runner import run_configured, run_stage
    from .stages import STAGES

    stage = STAGES[args.stage]
    if getattr(args, "weights", None):  # odsd eval --weights: a model other than the distilled student
        return run_stage(stage, cfg, Path(args.weights)).summary
    return run_configured(stage, cfg)


def cmd_run(args):
    from .pipeline import run_all  # lazily, like the stages (cmd_stage)

    return run_all(_config(args))


def cmd_shards_verify(args):
    from .shards.verify import print_report, verify_shards

    report = verify_shards(args.paths)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    return None


def _forward(prog: str, description: str, rest: list[str], add_args, run):
    """Sub-commands with many options of their own parse them lazily, so `odsd` starts fast."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_args(p)
    return run(p.parse_args(rest))


def cmd_shards_build(args):
    from .shards.build import add_build_args, build_cli

    return _forward("odsd shards build", SHARDS_BUILD_HELP, args.rest, add_build_args, build_cli)


def cmd_report_sampling(args):
    from .report.cli import add_report_args, report_cli

    return _forward("odsd report sampling", REPORT_HELP, args.rest, add_report_args, report_cli)


SHARDS_BUILD_HELP = "write img2dataset-style shards from an image folder or numpy arrays (--help for options)"
REPORT_HELP = "self-contained HTML page with PNG plots of a selection (--help for options)"
SCORE_EPILOG = """Reads every pool shard (score.shards) on Ray Data, decodes each entry at the teacher's input size and
scores it with the frozen teacher on an actor pool; writes per shard a score table (pred, maxprob, entropy,
energy, top-k logits, projected features) and a quarantine table (key, reason, detail) of the entries that
cannot be scored, each shard atomically with a ledger record, so a rerun scores only what is missing.

config keys (score.*, defaults):
  shards=[tars|folders|globs]  actors=1  actor_cpus=1  threads=(actor_cpus rounded up)  streams=(threads)
  batch_size=256  decode=tasks|actor  decode_cpus=0.5  decode_batch_size=256  reduced_decode=true
  max_pixels=50000000  topk=min(C,10)  feature_dim=256  device=cpu|cuda  num_gpus=0  dtype=float32
  inference=jit|eager  block_mb=1  max_errored_blocks=0  out=<out>/score
  decode=tasks: Ray Data tasks (decode_cpus each) decode between the reader and the actors;
  decode=actor: each actor decodes its batches on its own threads and the reader's tasks only read
  reduced_decode: a JPEG is decoded at the smallest DCT scale still >= 2x the teacher's input

examples:
  odsd score --config my.yaml --set score.actors=4
  odsd score --config my.yaml --set score.decode=actor --set score.actor_cpus=1.75 --set score.decode_cpus=0.25
"""
SAMPLE_EPILOG = """The selection table holds per image: key, url, weight and the sparse low-noise teacher target.

methods (sample.method; METHODS.md 1.2, 4):
  aps              Adaptive Prototype Sampling (default): N/C per teacher class by a_c*z(maxprob)
                   + a_r*z(cosine to the class prototype) + a_e*z(-energy), prototypes refined over rounds
  maxprob          N/C per teacher class by highest maxprob
  balanced-random  N/C per teacher class at random (seeded)
  random           N at random (seeded)
  entropy-high     the N most uncertain (highest entropy)
  all              the whole pool
  A class with fewer candidates than N/C keeps them all and hands the rest to the other classes.

config keys (sample.*, defaults):
  method=aps  n=30000  scores=<out>/score  out=<out>/sample  batch_rows=262144
  aps.a_c=1 aps.a_r=1 aps.a_e=1 aps.rounds=2 aps.prototypes_per_class=1 aps.kmeans_iters=5
  aps.prototype_source=all|confident aps.confident_threshold=0.5 aps.prototype_weight=maxprob|uniform
  aps.center=true (prototypes centred on the pool's mean feature)
  aps.weight_by_score=false  targets.topk=3 targets.tau=4  reshard=DIR pool_shards=[tars]  (seed: top-level)

examples:
  odsd sample --config my.yaml --set sample.method=maxprob --set sample.n=30000
  odsd sample --config my.yaml --set sample.aps.rounds=3 --reshard runs/my/train_shards
  odsd report sampling --config my.yaml --provenance provenance.parquet
"""
DISTILL_EPILOG = """Trains distill.student from the frozen teacher (teacher.weights) on the sample stage's selection
(or on distill.shards) with Ray Train (distill.workers workers, gloo on CPU, NCCL on GPU) and one DeepSpeed
engine per worker (ZeRO stage distill.zero_stage, 0-3). Checkpoints every distill.checkpoint_every steps and
at every epoch end; a failed worker group restarts from the latest one (distill.max_failures), and a rerun
after a crash continues the same run. Evaluates on eval.shards after every epoch.

methods (distill.method; docs/METHODS.md; options are distill.options.<method>.<key>):
  odsd      low-noise KD on the selection's sparse targets + student self-contrast (two views) + teacher
            relations (default); ablate with options.odsd.use_lnkd|use_self|use_rel=false, weigh with
            options.odsd.lambda_self (0.5) and options.odsd.lambda_rel (1)
  kd        Hinton KD on the teacher's full soft targets at options.kd.tau (4); options.kd.strong=true puts
            the student on ODSD's two strong views
  kd3       KD^3: per-step instance selection by (p_T + p_S)/2 >= options.kd3.delta, feature alignment
            through the teacher's classifier, MixDistribution contrast (options.kd3.feat, .md, .alpha)
  mosaickd  MosaicKD: a generator and a patch discriminator (own Adam optimizers, checkpointed with the
            student) against the student; options.mosaickd.adv|align|local|balance, .student_steps (5)
  ce        cross-entropy from labels (distill.source=shards with labelled shards; the scratch baseline)

config keys (distill.*, defaults):
  student=resnet8  method=odsd  workers=2  zero_stage=2  dtype=fp32|bf16  device=cpu|cuda
  optimizer=sgd|adamw  lr=0.05  batch_size=64 (per worker)  steps=(epochs x steps per epoch)  epochs=10
  checkpoint_every=200  max_failures=3  eval_every_epoch=true  worker_cpus=0.5  data_cpus=0.25
  source=selection|shards  selection=<out>/sample/selection.parquet  out=<out>/distill
  teacher_outputs=online|cached (cached: the teacher's outputs on cache.views weak views per image,
  computed once on Ray Data actors and shared through cache.dir; for kd and odsd)  channels_last=true

writes: student.safetensors (student only, with metadata), history.json (loss terms, eval per epoch,
best, resumes), ray_results/ (the Ray Train run and its DeepSpeed checkpoints), done.json

examples:
  odsd distill --config my.yaml --set distill.zero_stage=3 --set distill.workers=4
  odsd distill --config my.yaml --set distill.method=kd --set distill.steps=2000
  odsd distill --config my.yaml --set distill.options.odsd.use_rel=false   # an ablation
  odsd distill --config my.yaml --set distill.method=mosaickd --set distill.options.mosaickd.balance=5
"""
EVAL_EPILOG = """Top-1 and per-class accuracy on eval.shards (labelled WebDataset shards: KEY.jpg + KEY.cls or a
label in KEY.json), streamed batch by batch, with the teacher's (teacher.weights) accuracy on the same
shards beside it. `odsd distill` also runs it after every epoch (history.json keeps the last and the best).

writes: <out>/eval/eval.json (top1, per_class, n, teacher_top1, teacher_per_class), done.json

examples:
  odsd eval --config my.yaml                                        # the distilled student
  odsd eval --config my.yaml --weights runs/other/distill/student.safetensors
"""
RUN_EPILOG = """Chains score -> sample -> distill -> eval from one config. Every section is checked first (a bad
key or path is exit code 2 before any Ray work); each stage skips itself when its done.json matches its
inputs and config, so a rerun after an interruption continues where it stopped. Ends with the student's
top-1 beside the teacher's and the time of each stage.

examples:
  odsd teacher train && odsd run            # the demo (odsd_dist/configs/demo.yaml, from the repository root)
  odsd run --config my.yaml --set sample.n=30000 --set distill.zero_stage=3
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="odsd",
        description="odsd-dist: distil a small student from a trained teacher with open-world images "
        "(score -> sample -> distill -> eval), on Ray Data, Ray Train and DeepSpeed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def stage(name, func, help_, epilog=None):
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
        _add_config_args(p)
        p.set_defaults(func=func, stage=name)
        return p

    stage("score", cmd_stage, "score pool shards with the teacher on Ray Data; writes the score and quarantine tables",
          SCORE_EPILOG)
    p = stage("sample", cmd_stage, "select N pool images from the score table (APS or a baseline); writes selection.parquet",
              SAMPLE_EPILOG)
    p.add_argument("--reshard", metavar="DIR", help="also write the selected images as new training shards "
                   "into DIR (same as --set sample.reshard=DIR; pool tars from sample.pool_shards or score.shards)")
    stage("distill", cmd_stage, "train the student on the selection with Ray Train + DeepSpeed; writes student.safetensors",
          DISTILL_EPILOG)
    p = stage("eval", cmd_stage, "top-1 and per-class accuracy of a model on labelled shards; writes eval.json",
              EVAL_EPILOG)
    p.add_argument("--weights", help="model to evaluate (default: the distilled student)")
    stage("run", cmd_run, "score, sample, distill and eval, chained, skipping finished stages", RUN_EPILOG)

    teacher = sub.add_parser("teacher", help="teacher utilities").add_subparsers(dest="teacher_cmd", metavar="ACTION")
    teacher.required = True
    p = teacher.add_parser("train", help="train a teacher on labelled shards (config section teacher_train)",
                           description="train a teacher on labelled shards; writes teacher.weights (safetensors)")
    _add_config_args(p)
    p.set_defaults(func=cmd_stage, stage="teacher train")

    shards = sub.add_parser("shards", help="verify or build WebDataset shards").add_subparsers(dest="shards_cmd", metavar="ACTION")
    shards.required = True
    p = shards.add_parser("verify", help="count samples, members and damaged entries by reason")
    p.add_argument("paths", nargs="+", help="shard .tar files or folders")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("build", help=SHARDS_BUILD_HELP, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_shards_build)

    report = sub.add_parser("report", help="HTML reports").add_subparsers(dest="report_cmd", metavar="KIND")
    report.required = True
    p = report.add_parser("sampling", help=REPORT_HELP, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_report_sampling)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args, unknown = ap.parse_known_args(argv)
    if hasattr(args, "rest"):  # options of lazily parsed sub-commands
        args.rest = unknown + args.rest
    elif unknown:
        ap.error("unrecognized arguments: " + " ".join(unknown))
    if args.verbose:
        from .console import set_verbose

        set_verbose(True)
    if hasattr(sys.stdout, "reconfigure"):  # summaries (stdout) in order with bars and notes (stderr) in a pipe
        sys.stdout.reconfigure(line_buffering=True)
    try:
        args.func(args)
    except UserError as e:
        print(f"odsd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("odsd: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
