"""`odsd report sampling`'s command line: its arguments, defaults from the config, and the printed summary."""
from __future__ import annotations

import argparse

from ..config import load_config
from ..errors import UserError
from .classmap import BUILTIN_MAPS
from .inputs import selection_path
from .sampling import build_report

REPORT_EPILOG = """The page (one HTML file, plots embedded) shows: selected images per teacher class; score
distributions of selected vs rejected pool images; a t-SNE map of teacher features (selected,
rejected and, with --reference, original-domain images); with --provenance, the share of selected
images whose source class is a near neighbour of the teacher's class (built-in map for a CIFAR-10
teacher on the Tiny ImageNet pool: cifar10-tinyimagenet), printed for every selection.

example: APS vs maxprob on the 120k pool, judged with the provenance table
  odsd report sampling --selection runs/cifar10/sample-aps --compare runs/cifar10/sample-maxprob \\
      --provenance ../shared/data/openworld_provenance.parquet \\
      --reference ../shared/data/cifar10/test --teacher runs/cifar10/teacher.safetensors
"""


def add_report_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `odsd report sampling`."""
    p.epilog = REPORT_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", "-c", help="YAML config: default selection/scores/teacher paths come from it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--selection", help="selection.parquet or a sample dir (default: the config's sample dir)")
    p.add_argument("--scores", help="score dir (default: the one recorded in the selection metadata)")
    p.add_argument("--compare", action="append", default=[], metavar="SELECTION",
                   help="another selection to compare (class histogram, precision), e.g. a maxprob run; repeatable")
    p.add_argument("--provenance", help="provenance table (key, source, source_class, ...): reports only")
    p.add_argument("--class-map", help="JSON/YAML {teacher class: [near-neighbour source classes]} or "
                                       f"a built-in map ({', '.join(BUILTIN_MAPS)}); default: built-in for CIFAR-10 names")
    p.add_argument("--reference", action="append", default=[], metavar="SHARDS",
                   help="labelled original-domain shards (tar, folder or glob) for the map; repeatable")
    p.add_argument("--teacher", help="teacher safetensors for the reference (default: teacher.weights of the config)")
    p.add_argument("--reference-n", type=int, default=300, help="reference images to score (default 300)")
    p.add_argument("--max-points", type=int, default=2000, help="pool points in the map, half selected, half rejected (default 2000)")
    p.add_argument("--tsne-iters", type=int, default=400, help="t-SNE iterations (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the map subsample and t-SNE (default 0)")
    p.add_argument("--out", "-o", help="HTML file (default: <selection dir>/report.html)")


def report_cli(args) -> dict:
    """Run `odsd report sampling` from parsed arguments; prints the page's path and the precision figures."""
    selection, teacher = args.selection, args.teacher
    if selection is None or (args.reference and teacher is None):
        cfg = load_config(args.config, args.overrides)
        selection = selection or str(cfg.stage_dir("sample"))
        teacher = teacher or cfg.teacher.weights
    if args.max_points < 10 or args.reference_n < 1:
        raise UserError("--max-points must be >= 10 and --reference-n >= 1")
    sel_path = selection_path(selection)
    out = args.out or str(sel_path.parent / "report.html")
    s = build_report(str(sel_path), out, scores=args.scores, provenance=args.provenance, class_map=args.class_map,
                     compare=args.compare, reference=args.reference, teacher=teacher, reference_n=args.reference_n,
                     max_points=args.max_points, tsne_iters=args.tsne_iters, seed=args.seed)
    print(f"odsd report sampling: wrote {s['out']} ({s['plots']} plots, {s['map_points']} map points, {s['seconds']} s)")
    prec = s.get("precision") or {}
    for k, v in prec.items():
        print(f"  near-neighbour precision {k}: {v['overall']:.1%} ({v['hits']:,} of {v['counted']:,} judged "
              f"selected images; {v['unjudged']:,} without a source class)")
    first = next(iter(prec), None)
    for k in list(prec)[1:]:
        print(f"  {first} minus {k}: {100 * (prec[first]['overall'] - prec[k]['overall']):+.1f} points")
    return s
