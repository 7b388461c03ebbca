"""Seeded, time-bounded fuzzing of the decoder (tests/fuzz_decode.py) in a child process with a 1.5 GiB
address-space limit: every mutated member decodes or is quarantined with a reason; no crash, no hang,
no memory blow-up."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))


def test_fuzz_decoder_mutations():
    r = subprocess.run([sys.executable, str(HERE / "fuzz_decode.py"), "20", "5000", "20"], capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit)
    assert r.returncode == 0, r.stderr[-3000:]  # a crash (signal), an unexpected exception or MemoryError
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tried"] >= 1000, res  # enough mutations within the time bound
    assert res["counts"]["ok"] > 0 and len(res["counts"]) >= 4, res  # decoded ones and several reasons
    assert res["slowest_s"] < 2.0, res  # no decode near a hang
    assert res["maxrss_mb"] < 1024, res
