"""`odsd eval`: top-1 and per-class accuracy on labelled shards, the teacher beside the student, reruns skipped."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fixtures import make_teacher
from odsd_dist.config import build_config
from odsd_dist.errors import UserError
from odsd_dist.evaluate import evaluate_model, run_eval


class Constant(nn.Module):
    """Always predicts class `k`."""

    def __init__(self, k: int, c: int):
        super().__init__()
        self.k, self.c = k, c

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.c)
        z[:, self.k] = 1.0
        return z


def test_evaluate_model_counts_by_hand(labelled_shards):
    names = labelled_shards["class_names"]
    meta = {"num_classes": 3, "in_chans": 3, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
            "class_names": names}
    res = evaluate_model(Constant(1, 3), meta, labelled_shards["paths"], batch_size=7)
    labels = labelled_shards["labels"]
    assert res["n"] == len(labels) == 60
    assert res["top1"] == pytest.approx(float((labels == 1).mean()))
    assert res["per_class"] == {names[0]: 0.0, names[1]: 1.0, names[2]: 0.0}


def test_run_eval_writes_eval_json_with_teacher(labelled_shards, tmp_path):
    names = labelled_shards["class_names"]
    teacher = make_teacher(tmp_path / "teacher.safetensors", class_names=names, size=16, seed=0)
    student = make_teacher(tmp_path / "student.safetensors", class_names=names, size=16, seed=1)
    cfg = build_config({"out": str(tmp_path / "run"), "teacher": {"weights": teacher},
                        "eval": {"shards": labelled_shards["paths"], "batch_size": 16}})
    s = run_eval(cfg, weights=student)
    ev = json.loads((cfg.stage_dir("eval") / "eval.json").read_text())
    assert ev["top1"] == s["top1"] and ev["n"] == 60 and set(ev["per_class"]) == set(names)
    assert ev["teacher_top1"] is not None and 0 <= ev["teacher_top1"] <= 1
    assert len(list((cfg.stage_dir("eval") / "teacher_cache").glob("*.json"))) == 1
    # the same model evaluated directly gives the same figure
    from odsd_dist.models import load_model

    m, meta = load_model(student)
    assert evaluate_model(m, meta, labelled_shards["paths"], 64)["top1"] == pytest.approx(s["top1"])
    assert (cfg.stage_dir("eval") / "done.json").is_file()
    assert run_eval(cfg, weights=student)["top1"] == s["top1"]  # rerun: skipped, same summary


def test_run_eval_user_errors(labelled_shards, tmp_path):
    cfg = build_config({"out": str(tmp_path / "run"), "eval": {"shards": labelled_shards["paths"]}})
    with pytest.raises(UserError, match="not found"):
        run_eval(cfg)  # no distilled student yet
    with pytest.raises(UserError, match="eval.shards"):
        run_eval(build_config({"out": str(tmp_path / "run")}), weights=str(tmp_path / "x.safetensors"))
