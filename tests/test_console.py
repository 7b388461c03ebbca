"""The console without Ray (console.py): quiet by default, library output in the stage log, --verbose.
The real stage run, quiet and verbose, is tests/test_score.py::test_console_quiet_by_default_and_loud_on_demand."""
from __future__ import annotations

import logging

import pytest

from odsd_dist import console
from odsd_dist.cli import build_parser


@pytest.fixture
def library_logger():
    """A library logger with its own console handler, like Ray's "ray.data" (propagate=False)."""
    lg = logging.getLogger("ray.data")
    handler = logging.StreamHandler()
    old = lg.propagate, lg.level
    lg.propagate = False
    lg.setLevel(logging.INFO)
    lg.addHandler(handler)
    yield lg, handler
    lg.removeHandler(handler)
    lg.propagate, lg.level = old


def test_quiet_stage_log_takes_library_lines_and_notes_stay_on_console(tmp_path, capsys, monkeypatch,
                                                                      library_logger):
    monkeypatch.delenv(console.ENV, raising=False)
    lg, handler = library_logger
    with console.stage_log(tmp_path, "score") as path:
        lg.info("Execution plan of Dataset x")
        console.detail("odsd score: detail line")
        console.say("odsd score: a warning that matters")
    err = capsys.readouterr().err
    assert handler.level == logging.ERROR  # the library's console handler: errors only
    assert "a warning that matters" in err and "detail line" not in err
    text = path.read_text()
    assert path == tmp_path / "logs" / "score.log"
    assert "Execution plan of Dataset x" in text and "detail line" in text and "a warning that matters" in text
    assert not [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None) == str(path)]


def test_verbose_leaves_library_console_alone(tmp_path, capsys, monkeypatch, library_logger):
    monkeypatch.setenv(console.ENV, "1")
    lg, handler = library_logger
    with console.stage_log(tmp_path, "eval"):
        console.detail("odsd eval: detail line")
    assert handler.level == logging.NOTSET
    assert "detail line" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--verbose", "eval"], ["eval", "--verbose"], ["-v", "run"]])
def test_verbose_flag_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(argv[-1:] if argv[0].startswith("-") else argv[:1]).verbose is False


def test_distill_bar_follows_the_workers_lines(capsys):
    """The driver's distill bar is driven by the lines rank 0 of the training loop prints (loop.py `_say`)."""
    import io

    from tqdm import tqdm

    from odsd_dist.distill import _on_worker_line

    bar = tqdm(total=120, file=io.StringIO())
    for line in ("[distill] step 20/120 epoch 1 lnkd=1.0 total=1.0 150.0 samples/s",
                 "[distill] eval after epoch 1: top-1 21.50% (best 21.50%)",
                 "Reporting training result 2: ...",
                 "[distill] step 40/120 epoch 2 lnkd=1.0 total=1.0 150.0 samples/s"):
        _on_worker_line(line, bar, epochs=8)
    assert bar.n == 40 and bar.postfix == "epoch 3/8, top-1 21.50%"
    _on_worker_line("[distill] resumed from checkpoint at step 30 / 120", bar, epochs=8)
    assert bar.n == 30 and "resumed from the checkpoint at step 30" in capsys.readouterr().err
