"""Top-1 and per-class accuracy of a weights file on labelled shards (used for docs/TEACHER.md).

usage: python bench/eval_teacher.py runs/teacher/teacher.safetensors ../shared/data/cifar10/test [--threads 2] [--out J]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from odsd_dist.models import load_model, weights_sha256
from odsd_dist.shards.labelled import load_labelled
from odsd_dist.teacher import accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("shards", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, meta = load_model(a.weights)
    images, labels, _ = load_labelled(a.shards, int(meta["input_size"]), int(meta["in_chans"]), progress=False)
    t0 = time.time()
    top1, per = accuracy(model, images, labels, meta)
    res = {"weights": a.weights, "sha256": weights_sha256(a.weights), "arch": meta["arch"], "n": int(len(labels)),
           "top1": round(top1, 4), "eval_seconds": round(time.time() - t0, 1),
           "per_class": {n: round(p, 4) for n, p in zip(meta["class_names"], per)}}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
