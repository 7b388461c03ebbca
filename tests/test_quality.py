"""bench/quality.py end to end on tiny shards of another original domain (28x28 grey, 3 classes) and a
tiny pool: the same command as the CIFAR-10 benchmark, only the config differs. One row of every kind
trains (one seed, a few steps) through the real stages on a real local Ray; the table, the JSON and the
plots must hold every row. Every registered row's overrides are checked without Ray.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from fixtures import make_labelled_shards, make_pool_shards

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

ALL_ROWS = ["kd_pool", "kd_random", "kd_balanced_random", "kd_maxprob", "kd_strong", "kd3", "mosaickd", "odsd",
            "odsd_maxprob", "odsd_full_targets", "odsd_view_targets",
            "odsd_no_lnkd", "odsd_no_self", "odsd_no_rel", "oracle_kd", "scratch"]
# Trained end to end below: every kind of row (the whole pool, an N-row selection, ODSD with an ablation, the
# original split with KD and with labels + a tuning grid). The other registered rows differ only in their
# overrides, which test_every_registered_row_builds_a_valid_config checks without Ray (each distill run
# costs ~25 s of Ray Train start-up on 2 cores).
ROWS = ["kd_pool", "kd_random", "odsd", "odsd_no_rel", "oracle_kd", "scratch"]


def tiny_config(root: Path) -> dict:
    """Grey 28x28 original domain (train 3 x 16, test 3 x 6), a 2-shard pool with damage, a tiny teacher."""
    train = make_labelled_shards(root / "orig" / "train", n_classes=3, per_class=16, size=28, channels=1,
                                 n_shards=2, seed=3)
    test = make_labelled_shards(root / "orig" / "test", n_classes=3, per_class=6, size=28, channels=1, seed=4)
    pool = make_pool_shards(root / "pool", n_shards=2, per_shard=30, damage=True, size=28, n_classes=3, seed=5)
    return {
        "out": str(root / "out"),
        "ledger": str(root / "ledger"),
        "data": {"train": [train["folder"]], "test": [test["folder"]], "val_size": 0.25, "split_seed": 0},
        "teacher": {"train": True},
        "seeds": [0],
        "rows": ROWS[:-1] + [{"name": "scratch", "label": "Scratch (labels)"}],
        "tune": {"enabled": True, "rows": ["scratch"], "grid": {"distill.lr": [0.05, 0.1]},
                 "share": {"scratch": ["oracle_kd"]}},
        "odsd": {
            "seed": 0,
            "ray": {"num_cpus": 2},
            "teacher": {"weights": str(root / "teacher" / "teacher.safetensors")},
            "teacher_train": {"arch": "resnet8", "input_size": 28, "channels": 1, "epochs": 5, "batch_size": 16,
                              "threads": 1, "progress": False, "eval_batch_size": 64},
            "score": {"shards": [str(p) for p in pool["paths"]], "batch_size": 32, "decode_batch_size": 32},
            "sample": {"n": 12},
            # one worker (test_distill covers several), 6 steps of 4: two epochs of the N = 12 selected images
            "distill": {"student": "resnet8", "workers": 1, "worker_cpus": 1, "data_cpus": 0.25, "threads": 1,
                        "batch_size": 4, "steps": 6, "checkpoint_every": 100, "log_every": 2,
                        "eval_batch_size": 64, "decode_batch_size": 64, "augment": {"shuffle_buffer": 16}},
            "eval": {"batch_size": 64},
        },
        "quick": {"seeds": [0], "rows": ["kd_pool", "odsd"]},
    }


def test_rows_and_config_errors(tmp_path):
    """No Ray: the registry, inline rows, and the keys every row must share."""
    from odsd_dist.errors import UserError
    from quality.config import load_quality_config
    from quality.rows import known_rows
    from quality.runner import candidates, resolve_rows

    assert set(ALL_ROWS) <= set(known_rows())
    base = {"out": str(tmp_path / "o"), "data": {"train": ["t"], "test": ["t"]},
            "odsd": {"distill": {"steps": 4}}, "rows": ["kd_pool"]}

    def load(**kw):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, **kw}))
        return load_quality_config(str(path))

    qc = load(rows=["odsd", {"name": "kd_mine", "source": "pool", "set": {"sample.method": "all", "distill.method": "kd"},
                             "grid": {"distill.lr": [0.1, 0.2]}}],
              tune={"grid": {"distill.options.kd.tau": [2, 4]}, "rows": ["kd_mine"]})
    plans = resolve_rows(qc)
    assert [p.row.name for p in plans] == ["odsd", "kd_mine"] and plans[0].grid == {}
    assert plans[1].row.set == {"sample.method": "all", "distill.method": "kd"}  # typed, as written
    assert len(candidates(plans[1].grid)) == 4 and candidates({}) == [{}]
    texts = load(rows=[{"name": "odsd", "set": ["distill.options.odsd.use_rel=false"]}])  # `--set` texts too
    assert resolve_rows(texts)[0].row.set["distill.options.odsd.use_rel"] is False
    with pytest.raises(UserError, match="unknown row"):
        resolve_rows(load(rows=["nope"]))
    with pytest.raises(UserError, match="distill.steps"):
        resolve_rows(load(rows=[{"name": "odsd", "set": ["distill.steps=9"]}]))
    with pytest.raises(UserError, match="not tunable"):
        resolve_rows(load(rows=["odsd"], tune={"grid": {"sample.n": [1, 2]}}))
    with pytest.raises(UserError, match="odsd.distill.steps"):
        load(odsd={"distill": {}})
    with pytest.raises(UserError, match="odsd.distill.nope"):
        load(odsd={"distill": {"steps": 4, "nope": 1}})


def test_every_registered_row_builds_a_valid_config():
    """No Ray: each registered row's overrides are known keys with valid values, and its distill method
    accepts its options (what `odsd distill` checks before any Ray work)."""
    from odsd_dist.config import build_config
    from odsd_dist.distill.methods import Dims, build_method
    from quality.rows import SOURCES, get_row, known_rows

    for name in known_rows():
        row = get_row(name)
        cfg = build_config({}, [], row.set)
        build_method(cfg.distill.method, cfg.distill.options, Dims(8, 8, 3))
        assert row.source in SOURCES
        assert (cfg.distill.method == "ce") == (name == "scratch"), name  # only scratch trains on labels
        if row.source == "pool":
            assert "sample.method" in row.set, name


def test_quality_bench_tiny_grey(ray_local, tmp_path, capsys):
    from quality.cli import main

    cfg = tiny_config(tmp_path)
    path = tmp_path / "quality_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["--config", str(path)]) == 0

    out = Path(cfg["out"])
    for name in ("quality.md", "quality.json", "accuracy.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "quality.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ROWS
    md = (out / "quality.md").read_text()
    for r in doc["rows"]:
        assert f"| {r['label']} |" in md
        assert r["test_last"]["n"] == 1 and 0.0 <= r["test_last"]["mean"] <= 1.0, r["name"]
        assert r["steps"] == 6, r["name"]  # the same optimizer steps for every row
        run = r["runs"][0]
        assert run["val"]["curve"], r["name"]  # per-epoch validation accuracy from distill's history.json
        assert run["train_curve"], r["name"]
    by = {r["name"]: r for r in doc["rows"]}
    # the pool is scored once and shared; `all` trains on every intact pool image, the N rows on N
    assert by["kd_pool"]["train_images"] > by["kd_random"]["train_images"] == 12
    assert by["oracle_kd"]["train_images"] == by["scratch"]["train_images"] == 36  # 48 minus the 12 cut for val
    assert doc["setup"]["val_images"] == 12 and doc["setup"]["test_images"] == 18
    # tuned on val: two candidates for scratch, the chosen one reported; the other rows use the base config
    assert len(by["scratch"]["tuning"]["trials"]) == 2 and by["scratch"]["chosen"][0].startswith("distill.lr=")
    # oracle_kd takes scratch's choice (tune.share) without a search of its own
    assert by["oracle_kd"]["tuning"]["shared_from"] == "scratch" and by["oracle_kd"]["chosen"] == by["scratch"]["chosen"]
    assert not by["oracle_kd"]["tuning"]["trials"] and doc["complete"]
    assert by["odsd"]["chosen"] == [] and by["odsd"]["tuning"]["trials"] == []
    assert by["scratch"]["label"] == "Scratch (labels)"
    # two epochs: the student at the best validation epoch is evaluated on test too
    assert by["kd_random"]["test_at_best_val"]["n"] == 1
    # a rerun does no training: every stage's done.json matches
    assert main(["--config", str(path), "--rows", "kd_random"]) == 0
    # a later session: the working folders are gone, the ledger (committed) still holds every finished run
    records = sorted(p.relative_to(cfg["ledger"]) for p in Path(cfg["ledger"]).glob("*/*.json"))
    assert len(records) == len(ROWS) + 1, records  # every row's seed, plus scratch's other lr trial
    shutil.rmtree(out / "runs")
    assert main(["--config", str(path), "--rows", "kd_random,odsd"]) == 0
    assert not (out / "runs").exists()  # nothing trained again
    again = {r["name"]: r for r in json.loads((out / "quality.json").read_text())["rows"]}
    for name in ("kd_random", "odsd"):
        assert again[name]["test_last"] == by[name]["test_last"], name
    assert "2 of 2 runs taken from the ledger" in (out / "quality.md").read_text()
    capsys.readouterr()
    assert main(["--ledger", cfg["ledger"]]) == 0  # what a stopped run has measured, row by row, no training
    table = capsys.readouterr().out
    assert f"{len(records)} runs in" in table and table.count("| scratch | 0 | distill.lr=") == 2


def test_ledger_key_is_content_not_mtime(tmp_path):
    """No Ray: the ledger's input digest follows the bytes of the files, not their mtimes or folders."""
    from quality.ledger import Ledger, content_digest, stable_base
    from quality.rows import get_row

    a = tmp_path / "a" / "00000.tar"
    a.parent.mkdir()
    a.write_bytes(b"x" * 100)
    b = tmp_path / "b" / "00000.tar"
    b.parent.mkdir()
    b.write_bytes(b"x" * 100)
    os.utime(b, (1, 1))
    assert content_digest([str(a)]) == content_digest([str(b)])
    b.write_bytes(b"x" * 99 + b"y")
    assert content_digest([str(a)]) != content_digest([str(b)])
    # where a run writes and how often it logs do not change its key; what it trains does
    base = {"distill": {"steps": 10, "out": "x", "log_every": 5}, "ray": {"num_cpus": 2}}
    assert stable_base(base) == {"distill": {"steps": 10}}
    row = get_row("kd_pool")
    led = Ledger(str(tmp_path / "led"), {"base": stable_base(base)})
    rec = {"row": row.name, "seed": 0, "val": {"last": 0.5}, "test": {"last": 0.4}}
    led.put(row, "base", {}, 0, rec)
    assert led.get(row, "base", {}, 0)["test"] == {"last": 0.4}
    assert led.get(row, "base", {}, 1) is None
    other = Ledger(str(tmp_path / "led"), {"base": stable_base({"distill": {"steps": 11}})})
    assert other.get(row, "base", {}, 0) is None


def test_targets_pair_the_rows_seed_by_seed():
    """No Ray: ODSD - KD maxprob is reported as the mean difference and, seed by seed, over the seeds both ran."""
    from quality.report import targets

    def row(name, tops):
        runs = [{"seed": s, "test": {"last": t}} for s, t in tops.items()]
        return {"name": name, "runs": runs, "test_last": {"mean": sum(tops.values()) / len(tops)}}

    t = targets([row("odsd", {0: 0.70, 1: 0.68}), row("kd_maxprob", {0: 0.67, 1: 0.67, 2: 0.60})])
    g = t["odsd_minus_kd_maxprob"]
    assert g["paired"]["seeds"] == [0, 1] and g["paired"]["values"] == pytest.approx([0.03, 0.01])
    assert g["paired"]["mean"] == pytest.approx(0.02) and g["value"] == pytest.approx(0.69 - 0.6467, abs=1e-4)
    assert g["met"]  # the target reads the means, as before
