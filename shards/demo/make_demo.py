#!/usr/bin/env python3
"""Cut the small demo shards in shards/demo/ from the reference data (../shared/data, after its build.py).

    python shards/demo/make_demo.py [--data ../shared/data] [--out shards/demo]

Deterministic: the same reference data gives byte-identical demo shards. Written with the project's
own ShardWriter (odsd_dist/shards/writer.py), so the layout is the img2dataset one of the sources:

    cifar10/train/0000{0,1}.tar  2 x 900 labelled: the first 90 of each class (source key order)
                                 of cifar10/train/00000.tar and of cifar10/train/00001.tar
    cifar10/test/00000.tar       900 labelled: the first 90 of each class of cifar10/test/00000.tar
    cifar10/classes.json         copied
    openworld/0000{0,1}.tar      2 x 900 pool entries: the first 5 damaged keys of each damage kind
                                 (whole pool, key order) + the first 1,775 intact keys of
                                 openworld/00000.tar, shuffled with a fixed seed
    openworld_provenance.parquet the provenance rows of those keys, re-keyed, plus source_key/source_shard

Keys are re-assigned (5 digits of shard, 4 of position); json members carry the new key, everything
else (bytes, url, sha256, label) is the source's.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from odsd_dist.shards.build import LABELLED_SIDECAR, POOL_SIDECAR  # noqa: E402
from odsd_dist.shards.writer import ShardWriter  # noqa: E402
from odsd_dist.shards.decode import IMAGE_EXTS  # noqa: E402
from odsd_dist.shards.tario import iter_samples  # noqa: E402

PER_CLASS = 90  # 90 x 10 classes = 900 per shard: keeps the demo under 15 MB
DAMAGED_PER_KIND = 5
POOL_ENTRIES = 1800
POOL_SHARD = 900
SEED = "odsd-demo-2026"
KINDS = ("truncated", "empty", "not_image", "bomb", "no_image")


def _first_per_class(tar: Path, per_class: int) -> list[dict]:
    """Samples of a labelled source shard, in key order, keeping the first `per_class` of each label."""
    side = {r["key"]: r for r in pq.read_table(tar.with_suffix(".parquet")).to_pylist()}
    taken: dict[int, int] = {}
    out = []
    for s in iter_samples(tar):
        label = int(s["cls"])
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            s["_row"] = side[s["__key__"]]
            out.append(s)
    if len(taken) != 10 or min(taken.values()) < per_class:
        raise SystemExit(f"{tar}: not {per_class} images of each class")
    return out


def _write_labelled(samples_per_shard: list[list[dict]], folder: Path) -> list[str]:
    writer = ShardWriter(folder, LABELLED_SIDECAR, shard_size=max(len(s) for s in samples_per_shard))
    for shard in samples_per_shard:
        for s in shard:
            key = writer.next_key()
            row = dict(s["_row"], key=key)
            meta = json.loads(s["json"])
            meta["key"] = key
            writer.add([(f"{key}.jpg", s["jpg"]), (f"{key}.cls", s["cls"]),
                        (f"{key}.json", json.dumps(meta, sort_keys=True).encode())], row)
        writer.close_shard()
    return writer.close()


def make_cifar(data: Path, out: Path) -> dict:
    src = data / "cifar10"
    train = [_first_per_class(src / "train" / f"{i:05d}.tar", PER_CLASS) for i in (0, 1)]
    test = [_first_per_class(src / "test" / "00000.tar", PER_CLASS)]
    written = _write_labelled(train, out / "cifar10" / "train") + _write_labelled(test, out / "cifar10" / "test")
    shutil.copyfile(src / "classes.json", out / "cifar10" / "classes.json")
    return {"train": sum(map(len, train)), "test": sum(map(len, test)), "files": written}


def make_openworld(data: Path, out: Path) -> dict:
    prov = pq.read_table(data / "openworld_provenance.parquet").to_pylist()
    by_key = {r["key"]: r for r in prov}
    damaged = []
    for kind in KINDS:
        damaged += sorted(r["key"] for r in prov if r["damage"] == kind)[:DAMAGED_PER_KIND]
    intact = sorted(r["key"] for r in prov if r["damage"] is None and r["shard"] == "00000")
    intact = intact[: POOL_ENTRIES - len(damaged)]
    chosen = set(damaged) | set(intact)
    order = sorted(chosen)
    random.Random(SEED).shuffle(order)
    samples: dict[str, dict] = {}
    for shard in sorted({by_key[k]["shard"] for k in chosen}):
        for s in iter_samples(data / "openworld" / f"{shard}.tar"):
            if s["__key__"] in chosen:
                samples[s["__key__"]] = s
    writer = ShardWriter(out / "openworld", POOL_SIDECAR, shard_size=POOL_SHARD)
    new_prov = []
    for src_key in order:
        s = samples[src_key]
        key = writer.next_key()
        meta = json.loads(s["json"])
        meta["key"] = key
        members = [(f"{key}.{ext}", s[ext]) for ext in IMAGE_EXTS if ext in s]
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        writer.add(members, meta)
        p = dict(by_key[src_key])
        new_prov.append(dict(p, key=key, shard=key[:5], source_key=src_key, source_shard=p["shard"]))
    written = writer.close()
    table = pa.Table.from_pylist(new_prov)
    path = out / "openworld_provenance.parquet"
    pq.write_table(table, path, compression="zstd")
    counts: dict[str, int] = {}
    for p in new_prov:
        if p["damage"]:
            counts[p["damage"]] = counts.get(p["damage"], 0) + 1
    return {"entries": len(order), "damaged": counts, "damaged_keys": sorted(damaged),
            "files": written + [str(path)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="built reference data")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where to write")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "openworld" / "00000.tar").is_file() or not (data / "cifar10" / "train" / "00001.tar").is_file():
        print(f"reference data not built in {data}: run python {data}/build.py first", file=sys.stderr)
        return 2
    for sub in ("cifar10", "openworld"):
        shutil.rmtree(out / sub, ignore_errors=True)
    cifar = make_cifar(data, out)
    pool = make_openworld(data, out)
    files = cifar["files"] + pool["files"] + [str(out / "cifar10" / "classes.json")]
    size = sum(Path(f).stat().st_size for f in files)
    print(json.dumps({"cifar10_train": cifar["train"], "cifar10_test": cifar["test"],
                      "openworld": pool["entries"], "openworld_damaged": pool["damaged"],
                      "damaged_source_keys": pool["damaged_keys"], "bytes": size}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
