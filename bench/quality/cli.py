"""`python bench/quality.py --config bench/configs/quality_cifar10.yaml [--quick]`: the command line."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from odsd_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="benchmark YAML (bench/configs/quality_*.yaml)")
    p.add_argument("--quick", action="store_true", help="merge the config's `quick:` section (a short run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a benchmark config value, e.g. --set odsd.distill.steps=500 (repeatable)")
    p.add_argument("--out", help="output folder (default: the config's `out`)")
    p.add_argument("--rows", help="comma-separated subset of the config's rows")
    p.add_argument("--seeds", help="comma-separated seeds (default: the config's `seeds`)")
    p.add_argument("--list-rows", action="store_true", help="print the registered rows and exit")
    p.add_argument("--ledger", metavar="FOLDER", help="print the finished runs in a ledger folder (the config's "
                   "`ledger:`, e.g. bench/results/quality/cifar10) as a table and exit; trains nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from .config import load_quality_config
    from .rows import as_text, get_row, known_rows

    if args.list_rows:
        for n in known_rows():
            r = get_row(n)
            print(f"{n:<22} {r.source:<6} {r.label}: {' '.join(as_text(r.set))}")
        return 0
    if args.ledger:
        from .ledger import markdown_table

        if not Path(args.ledger).is_dir():
            print(f"error: --ledger: {args.ledger} is not a folder", file=sys.stderr)
            return 2
        print(markdown_table(args.ledger))
        return 0
    if not args.config:
        print("error: --config is required", file=sys.stderr)
        return 2
    try:
        overrides = list(args.overrides)
        if args.out:
            overrides.append(f"out={args.out}")
        if args.seeds:
            overrides.append(f"seeds=[{args.seeds}]")
        qc = load_quality_config(args.config, quick=args.quick, overrides=overrides)
        from .report import write_report
        from .runner import run_benchmark

        t0 = time.time()
        given = sys.argv[1:] if argv is None else argv
        command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in given)
        raw = run_benchmark(qc, [r.strip() for r in args.rows.split(",")] if args.rows else None,
                            on_row=lambda part: write_report(part, qc, command, ROOT))
        write_report(raw, qc, command, ROOT)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(qc.out)
    print((out / "quality.md").read_text())
    print(f"quality: done in {time.time() - t0:.0f} s; wrote {out / 'quality.md'}, {out / 'quality.json'}, "
          f"{out / 'accuracy.png'}, {out / 'curves.png'}", file=sys.stderr)
    return 0
