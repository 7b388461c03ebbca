"""Quality benchmark (issue 9): does ODSD earn its place? The papers' comparison at CPU scale.

Config-driven (nothing dataset-specific in code): the config names the original domain's labelled
train/test shards (a validation split is cut from train, or given), the pool, the teacher (trained or
loaded), the student, N, steps, batch size, seeds and the rows. Built on the project's own stages:
trains or loads the teacher, scores the pool once (or reuses a finished score dir), then for every row
samples and distils with the same steps and batch size, per seed, picks hyper-parameters on the
validation split and reports test top-1 once per configuration.

    python bench/quality.py --config bench/configs/quality_cifar10.yaml            # full mode
    python bench/quality.py --config bench/configs/quality_cifar10.yaml --quick    # <= 20 min on 2 cores
    python bench/quality.py --list-rows --config X                                 # the row registry

Writes into the config's `out` (or --out): quality.md (table), quality.json, accuracy.png, curves.png,
and per run runs/<row>/<id>-s<seed>/ (run.json, distill/, test.json). Reruns skip finished work.
Rows: bench/quality/rows.py (a registry; new methods are one `register(Row(...))` or an inline config row).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent), str(_HERE)):  # the repository root (odsd_dist) and bench/ (the quality package)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from quality.cli import main  # noqa: E402  (bench/quality/, the package beside this file)

if __name__ == "__main__":
    sys.exit(main())
