"""`odsd score` on a real local Ray: counts, damage reasons, ledger, reruns, Ctrl-C + resume (kill -9 of
workers and the driver, and a full disk: tests/test_faults.py)."""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures import make_pool_shards, make_teacher, wait_for
from odsd_dist.config import load_config
from odsd_dist.tables import read_meta

ROOT = Path(__file__).resolve().parents[1]


def _read(folder: Path, sub: str) -> pa.Table:
    files = sorted(glob.glob(str(folder / "score" / sub / "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")


def _cli(*args, cwd=ROOT, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "ODSD_VERBOSE": "0"}
    return subprocess.Popen([sys.executable, "-m", "odsd_dist.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _score_args(teacher, shards, out, *extra):
    return ["score", "--set", f"teacher.weights={teacher}", "--set", f"score.shards=[{shards}]",
            "--set", f"out={out}", "--set", "ray.num_cpus=2", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "t.safetensors", arch="resnet8")


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    """Enough entries that a run lasts a while on 2 cores (for kill -9 and Ctrl-C mid-run)."""
    return make_pool_shards(tmp_path_factory.mktemp("bigpool"), n_shards=8, per_shard=150, damage=True, seed=3)


def test_score_counts_reasons_and_rerun(pool_shards, teacher, tmp_path, ray_local):
    from odsd_dist.score import run_score

    cfg = load_config(None, [f"teacher.weights={teacher}", f"score.shards=[{pool_shards['folder']}]", f"out={tmp_path}"])
    s = run_score(cfg)
    assert s["rows"] == pool_shards["intact"]
    assert s["reasons"] == pool_shards["damaged"]
    scores, quarantine = _read(tmp_path, "scores"), _read(tmp_path, "quarantine")
    assert sorted(scores.column("key").to_pylist()) == sorted(pool_shards["intact_keys"])
    want = {k: r for r, keys in pool_shards["keys_by_reason"].items() for k in keys}
    assert dict(zip(quarantine.column("key").to_pylist(), quarantine.column("reason").to_pylist())) == want
    assert all(u.startswith("https://") for u in quarantine.column("url").to_pylist() + scores.column("url").to_pylist())
    # METHODS.md §1.1 columns
    assert scores.schema.field("feature").type.list_size == 64
    assert set(scores.column("shard").to_pylist()) == {Path(p).stem for p in pool_shards["paths"]}
    ent = scores.column("entropy").to_numpy()
    assert ((ent >= 0) & (ent <= 1)).all()
    assert all(len(v) == 10 for v in scores.column("topk_idx").to_pylist())
    meta = read_meta(sorted(glob.glob(str(tmp_path / "score" / "scores" / "*.parquet")))[0])
    assert meta["stage"] == "score" and len(meta["teacher_sha256"]) == 64 and meta["num_classes"] == 10
    assert (tmp_path / "score" / "done.json").exists() and (tmp_path / "score" / "config.yaml").exists()
    # a rerun after completion scores nothing
    again = run_score(cfg)
    assert again["shards_scored_now"] == 0 and again["rows"] == s["rows"]
    # an unfinished run (no done.json) whose ledger names a table that is gone scores that shard again
    table = tmp_path / "score" / "scores" / f"{Path(pool_shards['paths'][0]).stem}.parquet"
    before = table.read_bytes()
    table.unlink()
    (tmp_path / "score" / "done.json").unlink()
    redo = run_score(cfg)
    assert redo["shards_scored_now"] == 1 and redo["rows"] == s["rows"] and table.read_bytes() == before


def test_decode_in_actor_writes_the_same_tables(pool_shards, teacher, tmp_path, ray_local):
    """score.decode=actor (the actor decodes on its own threads) against the default decode tasks: the same
    rows, damage reasons and details, predictions, and scores to float rounding."""
    import numpy as np

    from odsd_dist.score import run_score

    base = [f"teacher.weights={teacher}", f"score.shards=[{pool_shards['folder']}]", "score.threads=2"]
    a = run_score(load_config(None, base + [f"out={tmp_path / 'tasks'}"]))
    b = run_score(load_config(None, base + [f"out={tmp_path / 'actor'}", "score.decode=actor",
                                            "score.actor_cpus=1.5", "score.decode_cpus=0.5"]))
    assert (a["rows"], a["reasons"]) == (b["rows"], b["reasons"]) == (pool_shards["intact"], pool_shards["damaged"])
    # the rate from the first shard's finish to the last one's, beside the end-to-end one
    assert len(pool_shards["paths"]) >= 2 and a["steady_images_per_s"] > 0 and b["steady_images_per_s"] > 0
    for sub in ("scores", "quarantine"):
        ta, tb = _read(tmp_path / "tasks", sub), _read(tmp_path / "actor", sub)
        assert ta.column_names == tb.column_names and ta.num_rows == tb.num_rows
        for name in ta.column_names:
            ca, cb = ta.column(name).to_pylist(), tb.column(name).to_pylist()
            if name in ("maxprob", "entropy", "energy", "topk_logit", "feature"):
                assert np.allclose(np.asarray(ca, np.float64), np.asarray(cb, np.float64), atol=1e-3), name
            else:
                assert ca == cb, name


def test_bad_config_exits_2_before_ray(pool_shards, teacher, tmp_path):
    cases = [
        (["score", "--set", f"teacher.weights={teacher}", "--set", f"score.shards=[{tmp_path}/nope]"], "score.shards"),
        (["score", "--set", "score.batchsize=3"], "score.batchsize"),
        (["score", "--set", "score.batch_size=-1"], "score.batch_size"),
        (["score", "--set", f"teacher.weights={tmp_path}/missing.safetensors",
          "--set", f"score.shards=[{pool_shards['folder']}]"], "teacher.weights"),
        (["score", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["score", "--set", f"teacher.weights={teacher}", "--set", f"score.shards=[{pool_shards['folder']}]",
          "--set", "ray.num_cpus=2", "--set", "score.actor_cpus=1.5", "--set", "score.decode_cpus=1"], "score.decode_cpus"),
    ]
    for args, named in cases:
        p = _cli(*args, "--set", f"out={tmp_path}/out")
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 2, out
        assert named in out, out
        assert "Started a local Ray" not in out
        assert not (tmp_path / "out" / "score" / "done.json").exists()


RAY_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b \S+\.py:\d+ --|core_worker\.cc|\(raylet\)|pid=\d+\)")


def test_console_quiet_by_default_and_loud_on_demand(pool_shards, teacher, tmp_path):
    """`odsd score`: quiet prints its progress bar and summary and none of Ray's own lines, which go to
    <out>/logs/score.log; `odsd --verbose score` prints Ray's output on the console too."""
    p = _cli(*_score_args(teacher, pool_shards["folder"], tmp_path / "quiet"))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    lines = out.replace("\r", "\n").splitlines()
    assert [ln for ln in lines if RAY_LINE.search(ln)] == [], out
    assert any(ln.startswith("odsd score:") and "2/2" in ln for ln in lines), out  # the progress bar
    assert "odsd score — summary" in out and "score rows" in out
    assert f"{sum(pool_shards['damaged'].values())} of" in out and "quarantined" in out  # the one-line warning
    log = (tmp_path / "quiet" / "logs" / "score.log").read_text()
    assert "Started a local Ray instance" in log and "Execution plan" in log

    p = _cli("--verbose", *_score_args(teacher, pool_shards["folder"], tmp_path / "loud"))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "Started a local Ray instance" in out and "Execution plan" in out
    assert "odsd score — summary" in out


def _ledger(out: Path) -> list[str]:
    return sorted(glob.glob(str(out / "score" / "ledger" / "*.json")))


def test_ctrl_c_then_resume_equals_uninterrupted(big_pool, teacher, tmp_path, ray_local):
    from odsd_dist.score import run_score

    interrupted = tmp_path / "interrupted"
    p = _cli(*_score_args(teacher, big_pool["folder"], interrupted, "--set", "score.batch_size=4"))
    wait_for(lambda: _ledger(interrupted), 240, "the first finished shard")
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, "the run was expected to be interrupted"
    finished = len(_ledger(interrupted))
    assert 1 <= finished < 8
    assert not (interrupted / "score" / "done.json").exists()
    # resume in-process: only the unfinished shards are scored
    cfg = load_config(None, [f"teacher.weights={teacher}", f"score.shards=[{big_pool['folder']}]", f"out={interrupted}",
                             "score.batch_size=4"])
    s = run_score(cfg)
    assert s["shards_scored_now"] == 8 - finished
    # the same tables as one uninterrupted run
    clean = tmp_path / "clean"
    run_score(load_config(None, [f"teacher.weights={teacher}", f"score.shards=[{big_pool['folder']}]", f"out={clean}",
                                 "score.batch_size=4"]))
    for sub in ("scores", "quarantine"):
        a, b = _read(interrupted, sub), _read(clean, sub)
        assert a.num_rows == b.num_rows and a.equals(b), sub


def test_pool_reader_does_not_import_torch():
    """Ray Data's read and decode workers import only odsd_dist.pool: no torch there (issue 21: each of
    `odsd score`'s ~10 worker processes paid for a torch import when the reader lived in score/)."""
    code = ("import sys; import odsd_dist.pool.source, odsd_dist.pool.decode, odsd_dist.pool.dupes; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
