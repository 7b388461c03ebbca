"""Seeded byte-level fuzzing of the decoder (run by tests/test_fuzz.py in a child process with a memory
limit, so a crash, a hang or a blow-up fails the test instead of taking pytest down).

`python fuzz_decode.py SEED N SECONDS` mutates pool-like members (every format of crawl_pool.cases and
the fixture pool's jpg/png/webp) N times or until SECONDS pass, decodes each with `decode_image`, and
prints one JSON line: mutations tried, outcome counts by reason, the slowest decode, peak RSS.
"""
from __future__ import annotations

import json
import resource
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crawl_pool import cases  # noqa: E402
from fixtures import _encode, shape_image  # noqa: E402
from odsd_dist.shards.decode import REASONS, Damaged, decode_image  # noqa: E402


def seeds() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = [(ext, data) for key, ext, data, reason in cases() if not reason and len(data) < 200_000]
    for fmt in ("jpg", "png", "webp"):
        for cls in range(3):
            out.append((fmt, _encode(shape_image(cls, 32 if cls else 64, rng, 1 if cls == 2 else 3), fmt)))
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits: bit flips, byte overwrites, a big number in a header, cuts, inserts, repeats."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not b:
            b = bytearray(b"\x00")
        kind = int(rng.integers(7))
        i = int(rng.integers(len(b)))
        head = int(rng.integers(min(len(b), 64)))  # headers live at the front: hit them often
        if kind == 0:
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            b[head] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, int(rng.integers(256))]))
        elif kind == 2:  # an absurd width/height/length in a header field
            b[head:head + 4] = struct.pack(">I", int(rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])))
        elif kind == 3:
            del b[int(rng.integers(1, len(b) + 1)):]
        elif kind == 4:
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif kind == 5:
            j = int(rng.integers(i, min(len(b), i + 256) + 1))
            b[i:i] = b[i:j] * int(rng.integers(1, 8))
        else:
            j = int(rng.integers(i, len(b) + 1))
            b[i:j] = bytes(j - i)
    return bytes(b)


def main(seed: int, n: int, seconds: float) -> dict:
    rng = np.random.default_rng(seed)
    pool = seeds()
    counts = {"ok": 0}
    slowest = (0.0, "")
    t_end = time.perf_counter() + seconds
    tried = 0
    while tried < n and time.perf_counter() < t_end:
        ext, data = pool[int(rng.integers(len(pool)))]
        m = mutate(data, rng)
        t0 = time.perf_counter()
        try:
            out = decode_image(m, ext, 32, 3, max_pixels=1_000_000)  # the bomb guard bounds the work per member
            assert out.shape == (32, 32, 3) and out.dtype == np.uint8
            counts["ok"] += 1
        except Damaged as d:
            assert d.reason in REASONS and d.detail, (d.reason, d.detail)
            counts[d.reason] = counts.get(d.reason, 0) + 1
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, f"{ext} {len(m)} bytes, seed {seed} mutation {tried}")
        tried += 1
    return {"tried": tried, "counts": counts, "slowest_s": round(slowest[0], 4), "slowest": slowest[1],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))))
