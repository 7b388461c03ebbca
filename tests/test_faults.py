"""Faults under load on a real local Ray (issue 20): kill -9 of a decode worker, a scoring actor and the
`odsd score` driver, and a full disk while tables are written. After a rerun the score and quarantine
tables are byte-identical to an uninterrupted run's: nothing lost, nothing duplicated, nothing half-written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from bench.synth import make_score_tables
from fixtures import make_pool_shards, make_teacher, wait_for
from odsd_dist.config import build_config, load_config
from odsd_dist.sample import run_sample

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS = 5


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool_shards(tmp_path_factory.mktemp("faultpool"), n_shards=N_SHARDS, per_shard=100, damage=True, seed=5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("t") / "t.safetensors", arch="resnet20")


def _args(teacher, pool, out, *extra) -> list[str]:
    # small batches: many of them per shard, so the kills land while shards are still to come on a fast machine
    return [f"teacher.weights={teacher}", f"score.shards=[{pool['folder']}]", f"out={out}", "score.batch_size=8",
            "score.decode_batch_size=32", *extra]


@pytest.fixture(scope="module")
def reference(pool, teacher, tmp_path_factory, ray_local):
    """An uninterrupted run's tables: {relative path: bytes}."""
    from odsd_dist.score import run_score

    out = tmp_path_factory.mktemp("ref")
    run_score(load_config(None, _args(teacher, pool, out)))
    return _tables(out)


def _tables(out: Path) -> dict[str, bytes]:
    folder = Path(out) / "score"
    return {str(p.relative_to(folder)): p.read_bytes()
            for sub in ("scores", "quarantine") for p in sorted((folder / sub).glob("*.parquet"))}


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    sets = [x for a in args for x in ("--set", a)]
    return subprocess.Popen([sys.executable, "-m", "odsd_dist.cli", "score", *sets, "--set", "ray.num_cpus=2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _ledger(out: Path) -> int:
    return len(list((Path(out) / "score" / "ledger").glob("*.json")))


def _find(p: subprocess.Popen, word: str):
    for proc in psutil.Process(p.pid).children(recursive=True):
        try:
            if word in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            pass
    return None


def _reap(procs: list) -> None:
    """End the processes a killed driver left behind (the ones this test started, by pid)."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=20)


def test_kill_decode_worker_and_actor_mid_shard(pool, teacher, reference, tmp_path):
    p = _cli(_args(teacher, pool, tmp_path))
    try:
        decoder = wait_for(lambda: _find(p, "ReadPool"), 120, "a decode worker")
        os.kill(decoder.pid, signal.SIGKILL)
        actor = wait_for(lambda: _find(p, "TeacherScorer") if _ledger(tmp_path) else None, 180,
                          "a scoring actor after the first shard")
        assert _ledger(tmp_path) < N_SHARDS, "the run finished before the actor was killed"
        os.kill(actor.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    assert _tables(tmp_path) == reference


def test_kill_driver_then_rerun(pool, teacher, reference, tmp_path):
    p = _cli(_args(teacher, pool, tmp_path))
    wait_for(lambda: _ledger(tmp_path) >= 2, 180, "two finished shards")
    children = psutil.Process(p.pid).children(recursive=True)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    _reap(children)
    done = _ledger(tmp_path)
    assert 2 <= done < N_SHARDS and not (tmp_path / "score" / "done.json").exists()
    again = _cli(_args(teacher, pool, tmp_path))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"{N_SHARDS - done} scored now" in out
    assert _tables(tmp_path) == reference


def test_table_write_hits_file_size_limit(tmp_path):
    """RLIMIT_FSIZE (a write fails with EFBIG, as on a full disk): no table, no temporary file, no ledger record."""
    code = f"""
import resource, signal, sys
import numpy as np, pyarrow as pa
sys.path.insert(0, {str(ROOT)!r})
from odsd_dist.tables import Ledger, write_table
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
t = pa.table({{"key": [str(i) for i in range(50_000)], "x": np.random.default_rng(0).random(50_000)}})
try:
    write_table(t, {str(tmp_path / 'scores' / '00000.parquet')!r})
    Ledger({str(tmp_path / 'ledger')!r}, "f").mark("00000", {{"rows": t.num_rows}})
except OSError as e:
    print("FAILED", e.errno)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "FAILED 27" in r.stdout, r.stdout + r.stderr  # EFBIG
    assert list(tmp_path.rglob("*")) == [tmp_path / "scores"]


def _tmpfs(path: Path, size: str, remount: bool = False) -> bool:
    opts = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_then_rerun(pool, teacher, reference, tmp_path):
    """`out` on a tmpfs too small for all tables: the run fails on ENOSPC, every table left is whole and
    recorded, and a rerun with room gives the uninterrupted run's bytes."""
    out = tmp_path / "out"
    out.mkdir()
    need = sum(len(b) for b in reference.values())
    if os.geteuid() != 0 or not _tmpfs(out, str(max(64 * 1024, need // 2 // 4096 * 4096))):
        pytest.skip("needs root to mount a tmpfs")
    try:
        p = _cli(_args(teacher, pool, out))
        log, _ = p.communicate(timeout=300)
        assert p.returncode != 0, "the run was expected to fail on a full disk"
        assert "No space left on device" in log, log[-3000:]
        left = _tables(out)
        assert 0 < len(left) < len(reference)
        assert not list((out / "score").rglob("*.tmp")) and not (out / "score" / "done.json").exists()
        for name in left:  # whatever is left is whole, and what the ledger trusts is the reference's
            pq.read_table(out / "score" / name)
            shard = Path(name).stem
            if (out / "score" / "ledger" / f"{shard}.json").exists():
                assert left[name] == reference[name]
        assert _tmpfs(out, "64m", remount=True)
        again = _cli(_args(teacher, pool, out))
        log, _ = again.communicate(timeout=300)
        assert again.returncode == 0, log[-3000:]
        assert _tables(out) == reference
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def test_kill_sample_driver_then_rerun(tmp_path, ray_local):
    """kill -9 of `odsd sample` while its Ray tasks run: no half-written selection; the rerun's selection
    is byte-identical to an uninterrupted run's."""
    scores = tmp_path / "scores" / "score"
    make_score_tables(scores, rows=20_000, num_classes=10, feature_dim=16, shards=4, seed=1)
    sets = {"seed": 5, "sample.method": "aps", "sample.n": 1000, "sample.scores": str(scores),
            "sample.batch_rows": 1024}
    ref = tmp_path / "ref"
    run_sample(build_config({"out": str(ref), "seed": 5, "sample": {"method": "aps", "n": 1000, "scores": str(scores),
                                                                   "batch_rows": 1024}}))
    out = tmp_path / "killed"
    args = [x for k, v in {**sets, "out": str(out), "ray.num_cpus": 2}.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen([sys.executable, "-m", "odsd_dist.cli", "sample", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def busy_task():
        for proc in psutil.Process(p.pid).children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and "IDLE" not in title and "Actor" not in title:
                return proc
        return None

    wait_for(busy_task, 180, "a running sample task")
    children = psutil.Process(p.pid).children(recursive=True)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    _reap(children)
    assert not (out / "sample" / "done.json").exists(), "the run finished before the kill"
    assert not list((out / "sample").rglob("*.tmp"))
    again = subprocess.run([sys.executable, "-m", "odsd_dist.cli", "sample", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert (out / "sample" / "selection.parquet").read_bytes() == (ref / "sample" / "selection.parquet").read_bytes()
