"""The stage runner (odsd_dist/runner.py) on real stages and the small test data: a finished stage is skipped
with one line, done.json is the last file written, and a UserError leaves no finished-looking result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import odsd_dist.runner
from fixtures import make_teacher
from odsd_dist.config import build_config
from odsd_dist.errors import UserError
from odsd_dist.evaluate import evaluate
from odsd_dist.stages import STAGES
from odsd_dist.teacher import train


@pytest.fixture
def no_ray(monkeypatch):
    """Neither stage here needs Ray: starting it is a failure."""
    def refuse(*a, **k):
        raise AssertionError("the runner started Ray for a stage that does not need it")

    monkeypatch.setattr(odsd_dist.runner, "init_ray", refuse)


@pytest.fixture
def eval_setup(labelled_shards, tmp_path):
    names = labelled_shards["class_names"]
    teacher = make_teacher(tmp_path / "teacher.safetensors", class_names=names, size=16, seed=0)
    student = Path(make_teacher(tmp_path / "student.safetensors", class_names=names, size=16, seed=1))
    cfg = build_config({"out": str(tmp_path / "run"), "teacher": {"weights": teacher},
                        "eval": {"shards": labelled_shards["paths"], "batch_size": 16}})
    return cfg, student


def _teacher_cfg(tmp_path: Path, shards: list[str], **kw):
    return build_config({"seed": 1, "teacher": {"weights": str(tmp_path / "t" / "teacher.safetensors")},
                         "teacher_train": {"shards": shards, "arch": "resnet8", "epochs": 1, "batch_size": 16,
                                           "progress": False, **kw}})


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_done_json_is_written_last(eval_setup, labelled_shards, tmp_path, no_ray):
    cfg, student = eval_setup
    first = evaluate(student, cfg)
    folder = cfg.stage_dir("eval")
    done = folder / "done.json"
    assert not first.skipped and first.output == json.loads((folder / "eval.json").read_text())
    assert all(p.stat().st_mtime_ns <= done.stat().st_mtime_ns for p in _files(folder))
    rec = json.loads(done.read_text())
    assert rec["stage"] == "eval" and "per_class" not in rec["summary"]  # Stage.stored: eval.json keeps those
    # teacher train: the weights and their history come before done.json, which names the weights' sha256
    tcfg = _teacher_cfg(tmp_path, labelled_shards["paths"])
    res = train(labelled_shards["paths"], tcfg)
    tdone = tmp_path / "t" / "done.json"
    assert res.output == tmp_path / "t" / "teacher.safetensors"
    assert all(p.stat().st_mtime_ns <= tdone.stat().st_mtime_ns for p in _files(tmp_path / "t"))
    assert "class_names" in res.summary and "class_names" not in json.loads(tdone.read_text())["summary"]


def test_finished_stage_is_skipped_with_one_line(eval_setup, capsys, no_ray):
    cfg, student = eval_setup
    first = evaluate(student, cfg)
    eval_json = cfg.stage_dir("eval") / "eval.json"
    mtime = eval_json.stat().st_mtime_ns
    capsys.readouterr()
    again = evaluate(student, cfg)
    out, err = capsys.readouterr()
    assert again.skipped and again.output == first.output and again.summary == first.summary
    assert out.strip().splitlines() == [f"odsd eval: {cfg.stage_dir('eval')} is up to date (done.json matches its "
                                        "inputs and config); nothing to do"]
    assert err == "" and eval_json.stat().st_mtime_ns == mtime
    # the runner opens the stage log around every run, the stage function called in-process included
    assert "is up to date" in (Path(cfg.out) / "logs" / "eval.log").read_text()
    # another input (the teacher's weights), same config: another result, the stage runs again
    assert not evaluate(Path(cfg.teacher.weights), cfg).skipped


def test_user_error_in_validation_writes_nothing(eval_setup, tmp_path, no_ray):
    cfg, student = eval_setup
    with pytest.raises(UserError, match="model weights not found"):
        evaluate(tmp_path / "nope.safetensors", cfg)
    with pytest.raises(UserError, match="eval.shards"):
        evaluate(student, build_config({"out": str(tmp_path / "run"), "eval": {"shards": []}}))
    assert not cfg.stage_dir("eval").exists()


def test_user_error_in_the_run_leaves_no_done_json(labelled_shards, pool_shards, tmp_path, no_ray):
    """A run that fails after it started drops the last done.json: the folder never reads as finished."""
    folder = tmp_path / "t"
    train(labelled_shards["paths"], _teacher_cfg(tmp_path, labelled_shards["paths"]))
    assert (folder / "done.json").is_file()
    unlabelled = _teacher_cfg(tmp_path, pool_shards["paths"])
    with pytest.raises(UserError, match="no labelled samples"):
        train(pool_shards["paths"], unlabelled)
    assert not (folder / "done.json").exists()


def test_every_command_is_a_declared_stage():
    from odsd_dist.cli import build_parser

    assert set(STAGES) == {"score", "sample", "distill", "eval", "teacher train"}
    assert all(STAGES[c].needs_ray for c in ("score", "sample", "distill"))
    assert not STAGES["eval"].needs_ray and not STAGES["teacher train"].needs_ray
    args = build_parser().parse_args(["teacher", "train"])
    assert args.stage == "teacher train"


def _module_imports(path: Path, name: str, package: bool) -> set[str]:
    """The odsd_dist modules `name` imports when it is first imported (module level, not under TYPE_CHECKING),
    with every package an import passes through (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    import ast

    base = name.split(".") if package else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "odsd_dist")
    # its own enclosing packages are already being imported when it runs: not an edge
    return {m for m in found if not name.startswith(m + ".")}


def test_no_import_cycle():
    """Issue 22: the stage configs sit beside their stages and config.py imports them; no module-level import
    of the product loops back (a stage names `Config` only under TYPE_CHECKING)."""
    root = Path(odsd_dist.runner.__file__).parent
    mods = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        package = path.name == "__init__.py"
        name = ".".join(rel.parts[:-1] if package else rel.parts)
        mods[name] = (path, package)
    graph = {n: _module_imports(p, n, pkg) & set(mods) - {n} for n, (p, pkg) in mods.items()}
    assert "odsd_dist.score.config" in graph["odsd_dist.config"]  # the walk sees what it should
    state: dict[str, int] = {}

    def visit(n, trail):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(n):] + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(graph[n]):
            visit(m, trail + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
