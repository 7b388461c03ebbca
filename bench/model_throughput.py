"""Training throughput (img/s, SGD step on random 32 px batches) of zoo models on this machine.

Used to pick the CIFAR-10 teacher arch (docs/TEACHER.md). Prints a table and writes JSON.
usage: python bench/model_throughput.py --archs resnet8 resnet20 wrn16_2 --threads 2 --out runs/bench/throughput.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from odsd_dist.models import build_model


def measure(arch: str, batch: int, size: int, steps: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    m = build_model(arch, 10, 3).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["resnet8", "resnet20", "wrn16_1", "wrn16_2"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    print(f"{'arch':16s} {'layout':14s} {'img/s':>8s}")
    for arch in a.archs:
        for cl in (False, True):
            ips = measure(arch, a.batch, a.size, a.steps, cl)
            rows.append({"arch": arch, "channels_last": cl, "img_per_s": round(ips, 1), "batch": a.batch,
                         "size": a.size, "threads": a.threads})
            print(f"{arch:16s} {'channels_last' if cl else 'contiguous':14s} {ips:8.1f}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
