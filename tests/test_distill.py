"""`odsd distill` on a real local Ray + real DeepSpeed (CPU, gloo): ZeRO 1-3 against ZeRO-0, a worker
killed with SIGKILL mid-run (resume from the latest checkpoint), a rerun after a failed run, and the
consolidated student (its accuracy equals the in-run evaluation).

Tiny on purpose (resnet8 at 16 px, 2 workers, a few steps, the training data materialised once): the cost
is Ray Train starting worker groups, not the steps.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fixtures import make_teacher
from odsd_dist.config import build_config
from odsd_dist.errors import UserError
from odsd_dist.tables import SELECTION_SCHEMA, write_table


@pytest.fixture(scope="module")
def distill_inputs(tmp_path_factory, pool_shards, labelled_shards) -> dict:
    """A teacher (real, randomly initialised resnet8 at 16 px), a selection over the intact pool keys."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_teacher(root / "teacher.safetensors", arch="resnet8", class_names=labelled_shards["class_names"],
                           size=16)
    keys = pool_shards["intact_keys"]
    rng = np.random.default_rng(0)
    n = len(keys)
    idx = [sorted(rng.choice(3, 2, replace=False).tolist()) for _ in keys]
    sel = pa.table({"key": keys, "shard": [k[:5] for k in keys], "url": [f"u/{k}" for k in keys],
                    "pred": pa.array([i[0] for i in idx], pa.int32()), "score": pa.array(np.ones(n), pa.float32()),
                    "weight": pa.array(np.ones(n), pa.float32()), "target_idx": pa.array(idx, pa.list_(pa.int32())),
                    "target_prob": pa.array([[0.7, 0.3]] * n, pa.list_(pa.float32()))}, schema=SELECTION_SCHEMA)
    write_table(sel, root / "selection.parquet", {"stage": "sample", "config": {"targets": {"tau": 4.0}}})
    return {"root": root, "teacher": teacher, "selection": str(root / "selection.parquet"),
            "pool": pool_shards["paths"], "eval": labelled_shards["paths"], "n": n}


def _cfg(inp: dict, out: Path, seed: int = 0, **distill):
    d = {"student": "resnet8", "method": "odsd", "selection": inp["selection"], "workers": 2, "worker_cpus": 0.5,
         "data_cpus": 0.25, "threads": 1, "zero_stage": 2, "batch_size": 8, "steps": 8, "checkpoint_every": 3,
         "max_failures": 2, "log_every": 1, "eval_batch_size": 64}
    d.update(distill)
    return build_config({"seed": seed, "out": str(out), "teacher": {"weights": inp["teacher"]},
                         "score": {"shards": inp["pool"]}, "eval": {"shards": inp["eval"]}, "distill": d})


def test_user_errors_before_ray(distill_inputs, tmp_path):
    from odsd_dist.distill import run_distill

    with pytest.raises(UserError, match="zero_stage"):
        _cfg(distill_inputs, tmp_path, zero_stage=5)
    with pytest.raises(UserError, match="selection not found"):
        run_distill(_cfg(distill_inputs, tmp_path, selection=str(tmp_path / "nope.parquet")))
    with pytest.raises(UserError, match="unknown method"):
        run_distill(_cfg(distill_inputs, tmp_path, method="mosaic"))
    with pytest.raises(UserError, match="needs labels"):
        run_distill(_cfg(distill_inputs, tmp_path, method="ce"))


@pytest.mark.parametrize("override,key", [
    ("distill.options.mosaickd.balanse=1", "distill.options.mosaickd.balanse"),  # unknown option
    ("distill.options.mosaickd.patch_size=7", "distill.options.mosaickd"),  # not one of 4, 10, 22
    ("distill.options.kd3.delta=1.5", "distill.options.kd3.delta"),  # out of range
    ("distill.options.kd3.mix_layer=nope", "distill.options.kd3.mix_layer"),  # not a module of the student
])
def test_method_option_errors_exit_2_before_ray(distill_inputs, tmp_path, capsys, override, key):
    """`odsd distill` with a bad method option: one line naming the key, exit 2, nothing started or written."""
    import yaml

    from odsd_dist.cli import main

    cfg = _cfg(distill_inputs, tmp_path, method="kd3")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["distill", "--config", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "distill").exists()  # failed before the stage wrote anything (or started Ray)


# --- which rows each worker trains on, and their augmentation: pure functions (no Ray) -------------------

def _rows_by_step(spec: dict, sizes: list[int], start: int, rank: int) -> dict:
    """{step: row ids of `rank`'s batch} from `start` to the end, pass after pass, as the loop asks for them."""
    from odsd_dist.distill.data import pass_items

    out, s, bs = {}, start, spec["batch_size"]
    while s < spec["total_steps"]:
        items, end = pass_items(spec, sizes, s, rank)
        rows = np.concatenate([np.frombuffer(it["rows"], np.int64) for it in items])
        assert len(rows) == (end - s) * bs  # whole steps, equal on every rank
        out.update({s + k: rows[k * bs:(k + 1) * bs].tolist() for k in range(end - s)})
        s = end
    return out


def test_rows_per_worker_and_step_are_a_function_of_seed_epoch_rank():
    sizes = [10, 7, 13, 10]  # row groups of uneven size: 40 rows, 5 steps of 4 per worker per epoch
    spec = {"seed": 0, "steps_per_epoch": 5, "total_steps": 12, "batch_size": 4, "epochs_per_pass": 2,
            "augment": {"shuffle_buffer": 12}, "aug_batch_rows": 6}
    runs = {r: _rows_by_step(spec, sizes, 0, r) for r in (0, 1)}
    assert runs[0] == _rows_by_step(spec, sizes, 0, 0)  # pure: the same plan every time
    for e in range(2):
        seen = [x for r in (0, 1) for s in range(5 * e, 5 * e + 5) for x in runs[r][s]]
        assert len(seen) == len(set(seen)) == 40  # each row once per epoch, over both workers
    assert runs[0][0] != runs[0][5]  # every epoch its own order
    for start in (3, 7, 10, 11):  # a resume at any step takes exactly the rest of the straight run
        for r in (0, 1):
            assert _rows_by_step(spec, sizes, start, r) == {s: v for s, v in runs[r].items() if s >= start}
    assert _rows_by_step(spec | {"seed": 1}, sizes, 0, 0) != runs[0]


def test_weak_view_is_the_teachers_crop_and_flip():
    """Distill's weak view and teacher training's crop + flip are one gather: the same parameters move the
    same pixels, channels first (float) or last (uint8), and a shift is exact (zeros come in at the edge)."""
    import torch

    from odsd_dist.distill.augment import shift_flip, weak_from_params, weak_params
    from odsd_dist.teacher import augment_batch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8))
    params = weak_params(12, rng, 3, True)
    p = torch.from_numpy(params.astype(np.int64))
    first = weak_from_params(x.permute(0, 3, 1, 2).float(), params)
    last = shift_flip(x, p[:, 0] < 0, p[:, 1], p[:, 2], channels_last=True)
    assert torch.equal(first, last.permute(0, 3, 1, 2).float())
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 1, 2] = 1.0
    moved = shift_flip(one, torch.tensor([True]), torch.tensor([-1]), torch.tensor([1]))
    assert moved[0, 0, 0, 0] == 1.0 and moved.sum() == 1.0  # out[y, x] = in[y + 1, (3 - x) - 1]
    gen = torch.Generator().manual_seed(0)
    assert augment_batch(x, 2, True, True, gen).shape == x.shape


def test_row_augmentation_ignores_batch_cuts():
    """A row's views depend on (seed, epoch, its idx) only: not on its batch, its place in it, or the cut."""
    from odsd_dist.distill.augment import augment_batch
    from odsd_dist.distill.config import AugmentConfig

    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), "idx": np.arange(100, 110),
             "weight": np.ones(10, np.float32)}
    kw = dict(views=2, aug=AugmentConfig(), mean=[0.5] * 3, std=[0.25] * 3)
    whole = augment_batch(batch, seed=(0, 3), **kw)
    order = np.array([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    for cut in (order[:3], order[3:]):
        part = augment_batch({k: v[cut] for k, v in batch.items()}, seed=(0, 3), **kw)
        for k in ("weak", "view0", "view1"):
            np.testing.assert_array_equal(part[k], whole[k][cut])
    other = augment_batch(batch, seed=(0, 4), **kw)
    assert not np.array_equal(other["view0"], whole["view0"]) and not np.array_equal(other["weak"], whole["weak"])


# --- ZeRO 1-3 against ZeRO-0 ---------------------------------------------------------------------------

def _zero_loop(config: dict) -> None:
    """Every ZeRO stage in turn, from the same initial weights, on the same per-rank batches."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch

    from odsd_dist.distill.config import DistillConfig
    from odsd_dist.distill.engine import DistillModule, build_engine, full_student_state, rank_state_bytes
    from odsd_dist.distill.methods import Dims, build_method
    from odsd_dist.distill.step import StepContext
    from odsd_dist.models import build_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(123)
    teacher = build_model("resnet8", 3, 3).eval()
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [{"weak": torch.randn(6, 3, 16, 16, generator=g), "weight": torch.ones(6)} for _ in range(4)]
    out = {}
    for stage in (0, 1, 2, 3):
        dcfg = DistillConfig(zero_stage=stage, batch_size=6, optimizer=config["optimizer"], lr=0.05, method="kd")
        torch.manual_seed(0)
        student = build_model("resnet8", 3, 3)
        method = build_method("kd", dcfg.options, Dims(student.feature_dim, teacher.feature_dim, 3))
        engine = build_engine(DistillModule(student, method, teacher), dcfg, 2, 4)
        ctx = StepContext(engine, teacher, method, seed=0, rank=rank, world=2, total_steps=4,
                          dtype=torch.float32, device=torch.device("cpu"))
        losses = []
        for step, b in enumerate(batches):
            ctx.step = step
            terms = method.train_step(b, ctx)
            losses.append(float(terms["total"]))
        sd = full_student_state(engine)
        out[stage] = {"losses": losses, "checksum": float(sum(v.double().sum() for k, v in sd.items()
                                                             if v.is_floating_point())),
                      "bytes": rank_state_bytes(engine)}
    # metrics without a checkpoint are not kept by Ray Train V2's result: write them beside the run
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def test_zero_stages_match_stage0(ray_local, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(_zero_loop, train_loop_config={"optimizer": "adamw", "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="zero-eq", storage_path=str(tmp_path)))
    trainer.fit()
    out = {int(k): v for k, v in json.loads((tmp_path / "rank0.json").read_text()).items()}
    ref = out[0]
    for stage in (1, 2, 3):
        np.testing.assert_allclose(out[stage]["losses"], ref["losses"], rtol=2e-4, atol=1e-5,
                                   err_msg=f"ZeRO-{stage} diverges from ZeRO-0")
        assert out[stage]["checksum"] == pytest.approx(ref["checksum"], rel=1e-4)
    # ZeRO-3 keeps half the parameters and half the optimizer state per rank (2 ranks)
    b0, b3 = out[0]["bytes"], out[3]["bytes"]
    assert b3["param_bytes"] < 0.6 * b0["param_bytes"]
    assert out[2]["bytes"]["optimizer_bytes"] < 0.8 * (b0["optimizer_bytes"] + b0["param_bytes"])


# --- fault tolerance ------------------------------------------------------------------------------------

class Killer(threading.Thread):
    """Once Ray Train has registered a checkpoint at step >= `after`, SIGKILLs worker `rank`'s process (once).

    The worker's pid comes from the file each worker writes after passing a checkpoint; registration is
    read from Ray Train's checkpoint-manager snapshot (a report is registered shortly after it is made).
    """

    def __init__(self, folder: Path, rank: int = 1, after: int = 3, timeout: float = 3600):
        super().__init__(daemon=True)
        self.folder = folder
        self.path = folder / "workers" / f"rank{rank}.json"
        self.after, self.timeout = after, timeout
        self.killed: dict | None = None

    def _registered_step(self) -> int:
        best = -1
        for snap in self.folder.glob("ray_results/*/checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
            except (OSError, json.JSONDecodeError):
                continue
            best = max(best, int((latest.get("metrics") or {}).get("step", -1)))
        return best

    def run(self) -> None:
        t0 = time.time()
        while time.time() - t0 < self.timeout:
            try:
                rec = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                rec = None
            if rec and self._registered_step() >= self.after:
                os.kill(rec["pid"], signal.SIGKILL)
                self.killed = rec | {"registered": self._registered_step()}
                return
            time.sleep(0.05)


def _check_student(folder: Path, history: dict, eval_paths: list[str], method: str = "odsd") -> None:
    """The consolidated student loads, and its accuracy equals the in-run evaluation of the last epoch."""
    from odsd_dist.evaluate import evaluate_model
    from odsd_dist.models import load_model

    model, meta = load_model(folder / "student.safetensors")
    assert meta["method"] == method and meta["steps"] == history["step"] and meta["arch"] == "resnet8"
    assert len(meta["teacher_sha256"]) == 64
    res = evaluate_model(model, meta, eval_paths, 64)
    assert res["top1"] == pytest.approx(history["evals"][-1]["top1"], abs=1e-9)
    assert res["per_class"] == history["evals"][-1]["per_class"]


@pytest.fixture(scope="module")
def train_data(ray_local, distill_inputs) -> Path:
    """The materialised training data (distill/data.materialise), made once and copied into each run's folder."""
    from odsd_dist.distill import STAGE
    from odsd_dist.distill.data import materialise

    cfg = _cfg(distill_inputs, distill_inputs["root"] / "data_run")
    plan = STAGE.plan(cfg, *STAGE.inputs(cfg)).work
    folder = distill_inputs["root"] / "train_data"
    tmeta = plan["teacher_meta"]
    rec = materialise(folder, selection=plan["selection"], shard_paths=plan["shard_paths"],
                      size=int(tmeta["input_size"]), channels=int(tmeta["in_chans"]), max_pixels=cfg.score.max_pixels,
                      decode_batch_size=64, data_cpus=0.25, with_labels=False)
    assert rec["rows"] == rec["expected"] == distill_inputs["n"]
    return folder


def _seed_train_data(cfg, train_data: Path) -> Path:
    """Copy the shared train_data into the run's folder (same inputs, same fingerprint: distill reuses it)."""
    import shutil

    folder = cfg.stage_dir("distill")
    shutil.copytree(train_data, folder / "train_data")
    return folder


def _losses(folder: Path) -> dict:
    """{step: every loss term} from a finished run's history.json (log_every=1: one entry per step)."""
    return {h["step"]: h["loss"] for h in json.loads((folder / "history.json").read_text())["history"]}


def _same_student(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    sa, sb = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight_run(ray_local, distill_inputs, train_data, tmp_path_factory) -> Path:
    """An uninterrupted `odsd distill` run (seed 0, 8 steps, 2 workers): the reference for reproducibility."""
    from odsd_dist.distill import run_distill

    cfg = _cfg(distill_inputs, tmp_path_factory.mktemp("straight"), steps=8)
    folder = _seed_train_data(cfg, train_data)
    run_distill(cfg)
    return folder


def test_same_seed_same_student(ray_local, distill_inputs, train_data, straight_run, tmp_path):
    """Two runs with one config and seed train on the same rows in the same (worker, step) order with the
    same augmentations: every logged loss term and the student's weights are bit-identical; another seed
    gives other ones."""
    from odsd_dist.distill import run_distill

    cfg = _cfg(distill_inputs, tmp_path / "again", steps=8)
    folder = _seed_train_data(cfg, train_data)
    run_distill(cfg)
    assert _losses(folder) == _losses(straight_run) and len(_losses(folder)) == 8
    assert _same_student(folder, straight_run)
    # another seed, 2 steps (Ray Train start-up is the cost): step 1's terms come before any update
    cfg = _cfg(distill_inputs, tmp_path / "seed1", seed=1, steps=2, eval_every_epoch=False)
    other = _seed_train_data(cfg, train_data)
    run_distill(cfg)
    a, b = _losses(other)[1], _losses(straight_run)[1]
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_local_feed_equals_ray_data_feed(ray_local, train_data):
    """Both feeds hand every rank the same batches, bit for bit (and no rank a row another rank has that
    epoch), from the start of a run and from a resume mid-epoch."""
    import ray  # noqa: F401  (the local cluster of ray_local)
    import torch

    from odsd_dist.distill.config import AugmentConfig
    from odsd_dist.distill.data import local_pass, pass_dataset, train_index

    units = train_index(str(train_data))
    rows = sum(n for *_, n in units)
    spec = {"seed": 3, "batch_size": 8, "workers": 2, "steps_per_epoch": rows // 16, "total_steps": 3 * (rows // 16),
            "epochs_per_pass": 2, "augment": AugmentConfig(shuffle_buffer=16).model_dump(mode="json"), "views": 2,
            "aug_batch_rows": 24, "mean": [0.5] * 3, "std": [0.25] * 3, "data_cpus": 0.25}

    def ray_data(start, rank):
        ds, end = pass_dataset(spec, units, start, rank)
        return list(ds.iter_torch_batches(batch_size=8, drop_last=True)), end

    for start in (0, spec["steps_per_epoch"] + 2):
        seen = []
        for rank in (0, 1):
            local, end = local_pass(spec, units, start, rank)
            local = list(local)
            remote, end2 = ray_data(start, rank)
            assert end == end2 == min(spec["total_steps"], (start // spec["steps_per_epoch"] + 2) * spec["steps_per_epoch"])
            assert len(local) == len(remote) == end - start
            for a, b in zip(local, remote):
                assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
            seen.append(torch.cat([b["weak"].flatten(1) for b in local[:spec["steps_per_epoch"] - start % spec["steps_per_epoch"]]]))
        assert not any((seen[0][:, None] == seen[1][None]).all(-1).any(1))  # disjoint within the epoch


@pytest.mark.parametrize("method,stage", [("odsd", 2), ("mosaickd", 3), ("kd3", 0)])
def test_worker_kill_resumes_from_checkpoint(ray_local, distill_inputs, train_data, tmp_path, method, stage, request):
    """A worker SIGKILLed mid-run: the group restarts from the latest checkpoint, with the method's own state
    (MosaicKD's generator, discriminator, their Adam states and step counters), and finishes; every term
    the method returns is in history.json; for ODSD the restarted group took exactly the batches the
    uninterrupted run took."""
    import torch

    from odsd_dist.distill import run_distill
    from odsd_dist.distill.step import METHOD_STATE

    # 2 epochs of 4 steps; checkpoints at 3, 4, 6 and 8
    cfg = _cfg(distill_inputs, tmp_path, steps=8, method=method, zero_stage=stage,
               options={"mosaickd": {"student_steps": 3, "ngf": 8, "ndf": 8}, "kd3": {"delta": 0.0}})
    folder = _seed_train_data(cfg, train_data)
    killer = Killer(folder, rank=1, after=3)
    killer.start()
    summary = run_distill(cfg)
    killer.join(1)
    assert killer.killed is not None, "no worker was killed"
    history = json.loads((folder / "history.json").read_text())
    assert history["step"] == 8 == summary["steps"] == summary["configured_steps"]
    # resumed from the latest checkpoint Ray Train had registered when the worker died (or a later one)
    assert history["resumes"] and history["resumes"][0]["from_step"] >= killer.killed["registered"] >= 3
    assert summary["resumes"] == len(history["resumes"]) >= 1
    steps = [h["step"] for h in history["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no step counted twice after the resume
    assert len(history["evals"]) == 2 and summary["last_top1"] == history["evals"][-1]["top1"]
    _check_student(folder, history, distill_inputs["eval"], method)
    terms = set().union(*(h["loss"] for h in history["history"]))
    assert {"odsd": {"lnkd", "self", "rel"}, "kd3": {"kd", "feat", "md", "kept"},
            "mosaickd": {"loss_d", "loss_g", "g_adv", "g_align", "g_local", "g_balance", "student_kd"}}[method] <= terms
    state_file = next(folder.glob("ray_results/*/checkpoint_00000008")) / METHOD_STATE
    if method == "mosaickd":  # aux steps at loop steps 0, 3, 6: the counters survived the restart
        st = torch.load(state_file, weights_only=True)
        assert {n: r["step"] for n, r in st["aux"].items()} == {"generator": 3, "discriminator": 3}
        assert st["aux"]["generator"]["optimizer"]["state"], "the generator's Adam state was not saved"
    else:
        assert not state_file.exists()  # heads train inside the engine: nothing beside its checkpoint
    if method == "odsd":  # the restarted workers took exactly the batches the uninterrupted run took
        straight = request.getfixturevalue("straight_run")
        assert _losses(folder) == _losses(straight)
        assert _same_student(folder, straight)
    # a rerun with nothing changed is skipped
    assert run_distill(cfg)["steps"] == 8


def test_rerun_after_failed_run_resumes(ray_local, distill_inputs, train_data, tmp_path):
    from odsd_dist.distill import run_distill

    def cfg(max_failures: int):  # ZeRO-3: partitioned parameters are checkpointed and restored too
        return _cfg(distill_inputs, tmp_path, max_failures=max_failures, zero_stage=3, steps=6, checkpoint_every=2,
                    eval_every_epoch=False)

    folder = _seed_train_data(cfg(0), train_data)
    killer = Killer(folder, rank=0, after=2)
    killer.start()
    with pytest.raises(Exception):
        run_distill(cfg(0))  # the run fails: no restarts allowed
    assert killer.killed is not None
    assert not (folder / "done.json").exists()
    # the rerun (max_failures is a runtime knob, not part of the run's identity) continues the same run
    summary = run_distill(cfg(1))
    history = json.loads((folder / "history.json").read_text())
    assert history["step"] == 6 == summary["steps"]
    assert history["resumes"] and history["resumes"][0]["from_step"] >= killer.killed["registered"] >= 2


# --- bf16 on CPU -----------------------------------------------------------------------------------------

BF16_STEP = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from odsd_dist.distill.config import DistillConfig
from odsd_dist.distill.engine import DistillModule, build_engine, full_student_state
from odsd_dist.distill.methods import Dims, build_method
from odsd_dist.models import build_model
torch.manual_seed(0)
teacher = build_model("resnet8", 10, 3).eval().requires_grad_(False).to(torch.bfloat16)
d = DistillConfig(student="resnet8", method="odsd", zero_stage=int(sys.argv[1]), dtype="bf16", batch_size=4, lr=1e-3)
s = build_model("resnet8", 10, 3)
e = build_engine(DistillModule(s, build_method("odsd", d.options, Dims(s.feature_dim, teacher.feature_dim, 10)), teacher), d, 1, 3)
g = torch.Generator().manual_seed(0)
for _ in range(2):
    v = [torch.randn(4, 3, 32, 32, generator=g).bfloat16() for _ in range(3)]
    b = {"weak": v[0], "view0": v[1], "view1": v[2],
         "weight": torch.ones(4), "tgt_idx": torch.tensor([[0, 1, 2]] * 4), "tgt_prob": torch.tensor([[0.6, 0.3, 0.1]] * 4)}
    t = e(e.module.method.loss, b, e.module.student, teacher); e.backward(t["total"]); e.step()
    assert torch.isfinite(t["total"]).item()
st = full_student_state(e)
assert all(v.dtype == torch.float32 for v in st.values() if v.is_floating_point()), "export is not fp32"
print("BF16-OK", float(t["total"]))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_steps_on_cpu(stage, tmp_path):
    """A bf16 DeepSpeed engine (CPU, gloo) takes ODSD steps; the exported student is fp32 (BatchNorm buffers included)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", BF16_STEP, str(stage), str(port)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0 and "BF16-OK" in r.stdout, r.stderr[-3000:]


# --- methods with modules of their own (kd3, mosaickd): resume equals an uninterrupted run --------------

def _method_resume_loop(config: dict) -> None:
    """Per method and ZeRO stage: 6 steps straight, and 3 steps + checkpoint + fresh engine/method (built
    from another seed) + load + 3 steps; the last 3 steps' terms and the final weights must be equal."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from odsd_dist.config import build_config
    from odsd_dist.distill.engine import DistillModule, build_engine, full_student_state
    from odsd_dist.distill.methods import Dims, build_method
    from odsd_dist.distill.step import StepContext
    from odsd_dist.models import build_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(123)
    teacher = build_model("resnet8", 3, 3).eval().requires_grad_(False)
    total = 6

    def batch(step: int) -> dict:  # each rank its own batches, the same in both runs
        g = torch.Generator().manual_seed(1000 * step + rank)
        return {"weak": torch.randn(6, 3, 16, 16, generator=g), "weight": torch.ones(6)}

    def build(method: str, stage: int, seed: int):
        d = build_config({}, [f"distill.method={method}", f"distill.zero_stage={stage}", "distill.batch_size=6",
                              "distill.options.kd3.delta=0", "distill.options.mosaickd.student_steps=2",
                              "distill.options.mosaickd.ngf=8", "distill.options.mosaickd.ndf=8"]).distill
        torch.manual_seed(seed)
        student = build_model("resnet8", 3, 3)
        m = build_method(method, d.options, Dims(student.feature_dim, teacher.feature_dim, 3, 16, 3))
        engine = build_engine(DistillModule(student, m, teacher), d, 2, total)
        ctx = StepContext(engine, teacher, m, seed=7, rank=rank, world=2, total_steps=total,
                          dtype=torch.float32, device=torch.device("cpu"))
        return engine, m, ctx

    def run(engine, m, ctx, steps) -> list:
        out = []
        for step in steps:
            ctx.step = step
            out.append({k: float(v) for k, v in m.train_step(batch(step), ctx).items()})
        return out

    def digest(engine, m) -> dict:
        sd = full_student_state(engine)
        aux = {n: float(sum(p.double().sum() for p in a.module.state_dict().values() if p.is_floating_point()))
               for n, a in m.aux.items()}
        return {"student": float(sum(v.double().sum() for v in sd.values() if v.is_floating_point())), "aux": aux}

    res = {}
    for method in config["methods"]:
        for stage in config["stages"]:
            engine, m, ctx = build(method, stage, 0)
            straight = run(engine, m, ctx, range(total))
            want = digest(engine, m)
            ck = Path(config["out"], f"{method}-{stage}")
            engine, m, ctx = build(method, stage, 0)
            first = run(engine, m, ctx, range(3))
            engine.save_checkpoint(str(ck), tag="t")
            if rank == 0:
                ctx.save(ck)
            dist.barrier()
            engine, m, ctx = build(method, stage, 99)  # another init: only the checkpoint can make them equal
            engine.load_checkpoint(str(ck), tag="t")
            ctx.load(ck)
            resumed = first + run(engine, m, ctx, range(3, total))
            got = digest(engine, m)
            res[f"{method}-{stage}"] = {"straight": straight, "resumed": resumed, "want": want, "got": got,
                                        "aux_steps": {n: s for n, s in ctx._aux_step.items()}}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(res))


def test_methods_resume_equals_uninterrupted(ray_local, tmp_path):
    """kd3 and mosaickd under ZeRO 0 and 3 with 2 workers: a run restored from a checkpoint (student, the
    generator and discriminator and their Adam states, their LR schedules) continues exactly as the
    uninterrupted run, and the aux modules stay identical on both ranks."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(_method_resume_loop,
                           train_loop_config={"methods": ["kd3", "mosaickd"], "stages": [0, 3], "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="method-resume", storage_path=str(tmp_path)))
    trainer.fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(r0) == {"kd3-0", "kd3-3", "mosaickd-0", "mosaickd-3"}
    for key, rec in r0.items():
        assert rec["resumed"] == rec["straight"], key  # every term of every step, bit for bit
        assert rec["got"] == rec["want"], key
        assert rec["got"]["aux"] == r1[key]["got"]["aux"], key  # aux modules identical on both ranks
    mk = r0["mosaickd-3"]
    assert mk["aux_steps"] == {"generator": 3, "discriminator": 3}  # steps 0, 2, 4 of 6 (student_steps=2)
    assert {"loss_d", "loss_g", "g_adv", "g_align", "g_local", "g_balance", "student_kd"} <= set(mk["straight"][0])
    assert "loss_g" not in mk["straight"][1]
    assert {"kd", "feat", "md", "kept"} <= set(r0["kd3-0"]["straight"][0])
    assert r0["kd3-0"]["straight"] == r0["kd3-3"]["straight"] or all(
        abs(a["total"] - b["total"]) < 1e-4 for a, b in zip(r0["kd3-0"]["straight"], r0["kd3-3"]["straight"]))


# --- cached teacher outputs -------------------------------------------------------------------------------

def test_cached_teacher_outputs_rebuild_the_stored_view(distill_inputs):
    """No Ray: the K views are a function of (seed, row id) alone; a training batch's weak view, rebuilt from
    the stored parameters, gives the teacher exactly the stored logits and features back."""
    import torch

    from odsd_dist.distill.augment import augment_batch
    from odsd_dist.distill.config import AugmentConfig
    from odsd_dist.distill.methods import Dims, build_method
    from odsd_dist.distill.teacher_cache import TeacherCacher, view_params
    from odsd_dist.models import load_model

    idx = np.array([5, 17, 2**40 + 3, 99])
    a = view_params(idx, 0, 6, 4, True)
    assert a.shape == (4, 6, 3) and (np.abs(a[:, :, 1:]) <= 4).all() and set(np.unique(a[:, :, 0])) <= {-1, 1}
    np.testing.assert_array_equal(view_params(idx[[2, 0]], 0, 6, 4, True), a[[2, 0]])  # batch-independent
    assert not np.array_equal(view_params(idx, 1, 6, 4, True), a)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    cacher = TeacherCacher(distill_inputs["teacher"], views=6, topk=2, feature_dim=8, seed=0, pad=4, flip=True,
                           threads=1)
    out = cacher({"image": image, "idx": idx, "weight": np.ones(4, np.float32)})
    assert out["tc_idx"].shape == (4, 6, 2) and out["tc_feat"].shape == (4, 6, 8) and out["tc_feat"].dtype == np.float16
    teacher, meta = load_model(distill_inputs["teacher"])
    aug = AugmentConfig()
    b = augment_batch(out, views=0, aug=aug, mean=meta["mean"], std=meta["std"], seed=(0, 3, 0))
    with torch.no_grad():
        z = teacher(torch.from_numpy(b["weak"]))
    val, top = z.topk(2, dim=1)
    np.testing.assert_array_equal(top.numpy(), b["t_idx"])
    np.testing.assert_allclose(val.numpy(), b["t_val"], rtol=1e-5, atol=1e-5)
    # a method sees the stored outputs as dense logits (-1e4 outside the top-k) without the teacher
    m = build_method("kd", build_config({}).distill.options, Dims(64, 8, 3))
    f_t, z_t = m.teacher_outputs({k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}, None)
    assert f_t.shape == (4, 8) and z_t.shape == (4, 3)
    assert torch.equal(z_t.topk(2, 1).indices.sort(1).values, torch.from_numpy(b["t_idx"]).sort(1).values)


def test_cached_teacher_outputs_end_to_end(ray_local, distill_inputs, train_data, tmp_path):
    """`odsd distill` with distill.teacher_outputs=cached: the cache is built once (resumable by chunk), the
    workers train from it without the teacher, and methods that need a live teacher refuse it."""
    from odsd_dist.distill import check_config, run_distill
    from odsd_dist.distill.teacher_cache import DONE

    with pytest.raises(UserError, match="needs the teacher at every step"):
        check_config(_cfg(distill_inputs, tmp_path, method="mosaickd", teacher_outputs="cached"))
    cfg = _cfg(distill_inputs, tmp_path, method="odsd", teacher_outputs="cached", steps=4, checkpoint_every=10,
               **{"cache": {"views": 3, "feature_dim": 16, "batch_size": 16}})
    folder = _seed_train_data(cfg, train_data)
    summary = run_distill(cfg)
    (done,) = (folder / "teacher_cache").glob(f"*/{DONE}")  # one folder per cache content
    rec = json.loads(done.read_text())
    assert rec["rows"] == distill_inputs["n"] and rec["views"] == 3
    assert summary["steps"] == 4
    history = json.loads((folder / "history.json").read_text())
    assert {"lnkd", "self", "rel"} <= set(history["history"][-1]["loss"])
