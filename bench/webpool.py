#!/usr/bin/env python
"""Web-size benchmark shards, generated on demand from the shared pool (not committed).

    python bench/webpool.py --pool ../shared/data/openworld --cifar ../shared/data/cifar10/test --out runs/webpool

Writes OUT/pool/000NN.tar (default 20,000 entries: every 6th pool entry plus every damaged one, which is
kept byte for byte) and OUT/cifar10_test/000NN.tar (the CIFAR-10 test split, same transform, with .cls
labels), plus OUT/manifest.json. Each intact image is upscaled (bilinear) to a long side of 256-800 px in a
web-like aspect-ratio mix, given a fixed film grain (upscaled 32 px images alone compress and decode far
more cheaply than photos; JPEGs only), and re-encoded: 85 % JPEG (quality 75-95; 5 % of those greyscale, 2 % CMYK,
3 % stored turned with an EXIF Orientation tag, so upright only if the decoder applies it), 10 % WebP,
5 % PNG. Everything is drawn from a seeded generator per entry key, so the tars are byte-identical on
every run (tar headers fixed by odsd_dist.shards.writer). Two processes; under 2 minutes on the 2-core machine.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from odsd_dist.shards.decode import IMAGE_EXTS, pick_image  # noqa: E402
from odsd_dist.shards.tario import iter_samples  # noqa: E402
from odsd_dist.shards.writer import TarWriter  # noqa: E402

ASPECTS = [(1.0, 0.15), (4 / 3, 0.35), (3 / 2, 0.25), (16 / 9, 0.10), (3 / 4, 0.10), (2 / 3, 0.05)]  # w/h, share
SHARD = 2500
_GRAIN = None


def _grain() -> np.ndarray:
    global _GRAIN
    if _GRAIN is None:
        _GRAIN = np.random.default_rng(12345).normal(0, 4, (800, 800, 3)).astype(np.int16)
    return _GRAIN


def _rng(key: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)])


def transform(data: bytes, key: str, seed: int) -> tuple[bytes, str, dict]:
    """One intact image -> (web-size bytes, extension, {width, height, kind})."""
    rng = _rng(key, seed)
    src = Image.open(io.BytesIO(data)).convert("RGB")
    aspect = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0]
    long_side = int(rng.integers(256, 801))
    w, h = (long_side, max(1, round(long_side / aspect))) if aspect >= 1 else (max(1, round(long_side * aspect)), long_side)
    im = src.resize((w, h), Image.BILINEAR)
    gy, gx = rng.integers(0, 800 - h + 1), rng.integers(0, 800 - w + 1)
    u = rng.random()
    if u < 0.85:  # grain on the JPEGs only: WebP and PNG encoders take 20-30 ms on a grainy 500x375 image
        arr = np.asarray(im, dtype=np.int16) + _grain()[gy:gy + h, gx:gx + w]
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    kind = "jpeg"
    if u < 0.85:
        ext, v = "jpg", rng.random()
        q = int(rng.integers(75, 96))
        if v < 0.05:
            im, kind = im.convert("L"), "jpeg_grey"
        elif v < 0.07:
            im, kind = im.convert("CMYK"), "jpeg_cmyk"
        if 0.07 <= v < 0.10:  # stored turned; the Orientation tag says how to turn it back
            orient = int(rng.choice([3, 6, 8]))
            turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orient]
            exif = Image.Exif()
            exif[0x0112] = orient
            im.transpose(turn).save(buf, "JPEG", quality=q, exif=exif.tobytes())
            kind = f"jpeg_exif{orient}"
        else:
            im.save(buf, "JPEG", quality=q)
    elif u < 0.95:
        ext, kind = "webp", "webp"
        im.save(buf, "WEBP", quality=int(rng.integers(75, 96)), method=0)
    else:
        ext, kind = "png", "png"
        im.save(buf, "PNG", compress_level=1)
    return buf.getvalue(), ext, {"width": w, "height": h, "kind": kind}


def _write_shard(job) -> dict:
    """job: (out tar path, [(key, {member ext: bytes}, label or None, damaged or None)], seed)."""
    path, entries, seed = job
    kinds: dict = {}
    with TarWriter(path) as tar:
        for key, members, label, damage in entries:
            picked = pick_image(members)
            meta = {"key": key}
            try:
                meta["url"] = json.loads(members["json"])["url"]
            except (KeyError, ValueError, TypeError):
                pass
            if damage is not None or picked is None or not picked[1]:
                for ext in sorted(members):  # damaged entries: the pool's bytes, unchanged
                    tar.add(f"{key}.{ext}", members[ext])
                kinds[f"damaged_{damage}"] = kinds.get(f"damaged_{damage}", 0) + 1
                continue
            data, ext, info = transform(picked[1], key, seed)
            kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
            tar.add(f"{key}.{ext}", data)
            if label is not None:
                tar.add(f"{key}.cls", str(label).encode())
                meta["label"] = label
            meta.update(width=info["width"], height=info["height"])
            tar.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return {"path": path, "entries": len(entries), "kinds": kinds, "bytes": os.path.getsize(path)}


def _damage_of(pool: str) -> dict:
    """key -> damage kind, from the pool's provenance table (a benchmark may read it; the pipeline never does)."""
    prov = Path(pool).parent / "openworld_provenance.parquet"
    t = pq.read_table(prov, columns=["key", "damage"]).to_pydict()
    return {k: d for k, d in zip(t["key"], t["damage"]) if d}


def _entries(shards: list[str], every: int, keep: dict, labelled: bool) -> list:
    out, i = [], 0
    for path in shards:
        for s in iter_samples(path):
            key = s["__key__"]
            if i % every == 0 or key in keep:
                members = {k: v for k, v in s.items() if not k.startswith("__") and (k in IMAGE_EXTS or k == "json")}
                label = int(s["cls"]) if labelled and "cls" in s else None
                out.append((key, members, label, keep.get(key)))
            i += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", default="../shared/data/openworld")
    ap.add_argument("--cifar", default="../shared/data/cifar10/test", help="labelled CIFAR-10 test shards ('' to skip)")
    ap.add_argument("--out", default="runs/webpool")
    ap.add_argument("--every", type=int, default=6, help="take every n-th pool entry (6: 20,000 of 120,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    pool = sorted(glob.glob(os.path.join(args.pool, "*.tar")))
    if not pool:
        raise SystemExit(f"--pool: no .tar files in {args.pool}")
    damage = _damage_of(args.pool)
    jobs = []
    sets = [("pool", _entries(pool, args.every, damage, False))]
    if args.cifar:
        sets.append(("cifar10_test", _entries(sorted(glob.glob(os.path.join(args.cifar, "*.tar"))), 1, {}, True)))
    for name, entries in sets:
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.tar"):
            old.unlink()
        for j in range(0, len(entries), SHARD):
            jobs.append((str(folder / f"{j // SHARD:05d}.tar"), entries[j:j + SHARD], args.seed))
    with mp.get_context("fork").Pool(args.procs) as p:
        res = p.map(_write_shard, jobs, chunksize=1)
    manifest = {"seed": args.seed, "every": args.every, "seconds": round(time.perf_counter() - t0, 1), "shards": []}
    for r in res:
        r["sha256"] = hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
        manifest["shards"].append(r)
    totals: dict = {}
    for r in res:
        for k, v in r["kinds"].items():
            totals[k] = totals.get(k, 0) + v
    manifest["kinds"] = dict(sorted(totals.items()))
    Path(args.out, "manifest.json").write_text(json.dumps(manifest, indent=1))
    mb = sum(r["bytes"] for r in res) / 2**20
    print(f"webpool: {sum(r['entries'] for r in res):,} entries in {len(res)} shards, {mb:,.0f} MB, "
          f"{manifest['seconds']} s -> {args.out}")
    print("  " + ", ".join(f"{k} {v:,}" for k, v in manifest["kinds"].items()))


if __name__ == "__main__":
    main()
