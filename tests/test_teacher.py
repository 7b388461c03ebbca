"""`odsd teacher train` end to end on tiny synthetic labelled shards, plus its vectorised augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from odsd_dist.cli import main
from odsd_dist.config import build_config
from odsd_dist.models import load_model, weights_sha256
from odsd_dist.teacher import augment_batch, lr_at, predict


def _config(tmp_path: Path, shards: dict, **train) -> Path:
    tt = {"shards": [shards["folder"]], "arch": "resnet8", "epochs": 2, "batch_size": 16, "lr": 0.05,
          "threads": 1, "progress": False}
    tt.update(train)
    doc = {"seed": 3, "out": str(tmp_path / "runs"), "teacher": {"weights": str(tmp_path / "t" / "teacher.safetensors")},
           "teacher_train": tt}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_teacher_train_writes_loadable_weights(tmp_path, labelled_shards, capsys):
    cfg = _config(tmp_path, labelled_shards, val_shards=[labelled_shards["folder"]])
    assert main(["teacher", "train", "--config", str(cfg)]) == 0
    weights = tmp_path / "t" / "teacher.safetensors"
    model, meta = load_model(weights)
    assert meta["arch"] == "resnet8" and meta["num_classes"] == 3 and meta["in_chans"] == 3
    assert meta["class_names"] == labelled_shards["class_names"]
    assert meta["input_size"] == 32 and len(meta["mean"]) == 3 and all(0 < s < 1 for s in meta["std"])
    assert meta["teacher_train"]["epochs"] == 2 and 0 <= meta["val_acc"] <= 1
    pred = predict(model, labelled_shards["images"], meta)
    assert pred.shape == (labelled_shards["n"],)
    assert (tmp_path / "t" / "done.json").is_file() and not (tmp_path / "t" / "teacher_checkpoint.safetensors").exists()
    out = capsys.readouterr().out
    assert "odsd teacher train" in out and "val top-1" in out
    # a rerun with the same config and data is skipped and leaves the weights alone
    mtime = weights.stat().st_mtime_ns
    assert main(["teacher", "train", "--config", str(cfg)]) == 0
    assert "nothing to do" in capsys.readouterr().out and weights.stat().st_mtime_ns == mtime


def test_teacher_is_deterministic_and_trains_grey(tmp_path, labelled_grey_shards):
    shas = []
    for run in ("a", "b"):
        cfg = _config(tmp_path / run, labelled_grey_shards, epochs=1, channels=1, input_size=28, augment="crop")
        assert main(["teacher", "train", "--config", str(cfg)]) == 0
        shas.append(weights_sha256(tmp_path / run / "t" / "teacher.safetensors"))
    assert shas[0] == shas[1]
    _, meta = load_model(tmp_path / "a" / "t" / "teacher.safetensors")
    assert meta["in_chans"] == 1 and meta["input_size"] == 28


@pytest.mark.parametrize("override, needle", [
    ("teacher_train.shards=[/no/such/dir/x.tar]", "teacher_train.shards"),
    ("teacher_train.shards=[]", "teacher_train.shards"),
    ("teacher_train.val_shards=[/no/such.tar]", "teacher_train.val_shards"),
    ("teacher_train.arch=nonet", "unknown model arch"),
    ("teacher.weights=/tmp/x.pt", "teacher.weights"),
])
def test_bad_input_exits_2(tmp_path, labelled_shards, capsys, override, needle):
    cfg = _config(tmp_path, labelled_shards)
    assert main(["teacher", "train", "--config", str(cfg), "--set", override]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "t" / "teacher.safetensors").exists()


def test_augment_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8, generator=gen)
    assert torch.equal(augment_batch(x, 0, False, False, gen), x)
    flipped = augment_batch(x, 0, False, True, gen)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(2)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    crop = augment_batch(x, 2, True, False, gen)
    assert crop.shape == x.shape
    for b in range(16):  # each crop is a window of the zero-padded image
        pad = torch.zeros(12, 12, 3, dtype=torch.uint8)
        pad[2:10, 2:10] = x[b]
        assert any(torch.equal(crop[b], pad[i:i + 8, j:j + 8]) for i in range(5) for j in range(5))


def test_lr_schedule():
    tc = build_config({"teacher_train": {"lr": 0.2, "warmup_frac": 0.2}}).teacher_train
    lrs = [lr_at(s, 100, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2 / 25 + (0.2 - 0.2 / 25) / 20)
    assert max(lrs) == pytest.approx(0.2) and np.argmax(lrs) == 19
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
