"""What odsd prints: quiet by default, Ray's own output on demand, everything in the run folder's logs.

Quiet (the default): a stage prints one progress bar, the lines a user must see (`say`: a skipped stage,
a resumed run, a config that leaves CPUs idle, quarantined entries) and its summary. The log lines of
Ray, Ray Data, Ray Train and DeepSpeed, Ray Data's progress output, Python warnings and everything Ray's
worker processes print go to `<out>/logs/<stage>.log` only. Verbose (`odsd --verbose`, or
ODSD_VERBOSE=1): all of that on the console too, as Ray prints it (and still in the stage log). Ray's
session logs (/tmp/ray/session_*/logs) are kept either way.

Documented switches do most of it: Ray Data's DataContext (no progress bars, no execution plan) and the
library loggers' console handlers (errors only). Three things have none, and are done here:
- the output of worker processes: `log_to_driver=False` would drop it from the run folder, so the
  driver's forwarding hook (the "ray_print_logs" handler of Ray's stdstream dispatcher) is swapped for
  one that writes to the stage log (no hook in this Ray: log_to_driver=False);
- the raylet's warnings pushed to the driver ("8 PYTHON worker processes have been started"), which Ray
  prints itself: they go to the stage log, its errors still print;
- what Ray's C++ core writes straight to descriptor 2: in a plain process (not under pytest's capture)
  descriptor 2 points at the stage log while sys.stderr keeps the terminal.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from tqdm import tqdm

ENV = "ODSD_VERBOSE"
NOTE = logging.INFO + 5  # `say`: on the console in quiet mode too
log = logging.getLogger("odsd_dist")  # the package's module loggers (odsd_dist.*) propagate here
logging.addLevelName(NOTE, "NOTE")
# loggers that print to the console on their own: Ray's (PlainRayHandler on "ray" and "ray.data") and
# DeepSpeed's (a StreamHandler to stdout, in processes that import it)
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed")
_FORMAT = logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")  # Ray's


def verbose() -> bool:
    """True when Ray's own output is wanted on the console (`odsd --verbose` or ODSD_VERBOSE=1)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Set for this process and every process it starts (a local Ray's workers inherit the environment)."""
    os.environ[ENV] = "1" if on else "0"


class _Console(logging.Handler):
    """odsd's own lines on sys.stderr as it is at emit time (pytest's capsys), without breaking a tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.flush()
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (never fail a stage for a console line)
            self.handleError(record)


_console = _Console()
_console.setFormatter(logging.Formatter("%(message)s"))
log.addHandler(_console)
log.propagate = False
log.setLevel(logging.INFO)


def _console_level() -> int:
    return logging.INFO if verbose() else NOTE


def say(msg: str) -> None:
    """A line the user must see, quiet or not (and in the stage log)."""
    _console.setLevel(_console_level())
    log.log(NOTE, msg, stacklevel=2)


def detail(msg: str) -> None:
    """A line for the stage log, on the console only when verbose."""
    _console.setLevel(_console_level())
    log.info(msg, stacklevel=2)


def to_log(msg: str) -> None:
    """A line for the stage log only (one the caller prints itself, e.g. the runner's skip line)."""
    h = _stage.handler
    if h is not None:
        fn, lno, func, _ = log.findCaller(stacklevel=2)  # the caller's file and line, as in detail()'s records
        h.handle(log.makeRecord(log.name, logging.INFO, fn, lno, msg, None, None, func))


def progress(total=None, desc: str = "", unit: str = "it", **kw):
    """The stage's progress bar on stderr: items, rate, ETA (redrawn in place on a terminal)."""
    tty = sys.stderr.isatty()
    sys.stdout.flush()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty, leave=True,
                mininterval=0.5 if tty else 10.0, **kw)


def quiet_libraries() -> None:
    """Quiet mode: the library loggers' own console handlers show errors only; their records go to the
    current stage log. Call again after importing a library that sets up its loggers (ray.data does)."""
    quiet = not verbose()
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers if quiet else ():
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR)
        if _stage.handler is not None and not lg.propagate and _stage.handler not in lg.handlers:
            lg.addHandler(_stage.handler)
            _stage.attached.append(lg)


# ---------------------------------------------------------------------------------------- Ray worker output

class _Sink:
    """Where forwarded worker output goes: the current stage log, and listeners (the distill progress bar)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.handler: Optional[logging.Handler] = None
        self.listeners: list[Callable[[str], None]] = []

    def write_batch(self, data: dict) -> None:
        name = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({name} pid={data.get('pid')}) "
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":  # only its events, as Ray's own printer does
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        with self.lock:
            h, listeners = self.handler, list(self.listeners)
        if h is not None:
            h.acquire()
            try:
                h.stream.write("".join(prefix + line + "\n" for line in lines))
                h.flush()
            finally:
                h.release()
        for line in lines:
            for fn in listeners:
                try:
                    fn(line)
                except Exception:  # noqa: BLE001  (a listener never stops log forwarding)
                    pass


_sink = _Sink()


def _dispatcher():
    """Ray's hook for the output it forwards from worker processes to the driver (None if this Ray lacks it)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as d
    except ImportError:
        return None
    return d if hasattr(d, "add_handler") and hasattr(d, "remove_handler") else None


def can_forward_worker_output() -> bool:
    return _dispatcher() is not None


def forward_worker_output() -> None:
    """Route the output Ray forwards from worker processes to the stage log and the listeners; in quiet mode
    Ray's own console printer of it is removed and the raylet's warnings go to the stage log only.
    Call after ray.init(log_to_driver=True)."""
    d = _dispatcher()
    d.remove_handler("odsd_logs")
    if not verbose():
        d.remove_handler("ray_print_logs")
    d.add_handler("odsd_logs", _sink.write_batch)
    from ray._private import worker

    if not getattr(worker.print_to_stdstream, "odsd", False):
        ray_print = worker.print_to_stdstream

        def print_to_stdstream(data, ignore_prefix):
            if data.get("pid") != "raylet":
                return ray_print(data, ignore_prefix)
            _sink.write_batch(data)
            if verbose() or not all(line.startswith("WARNING") for line in data.get("lines") or []):
                ray_print(data, ignore_prefix)

        print_to_stdstream.odsd = True
        worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def worker_lines(fn: Callable[[str], None]) -> Iterator[None]:
    """Call `fn(line)` for every line Ray forwards from worker processes while the block runs."""
    with _sink.lock:
        _sink.listeners.append(fn)
    try:
        yield
    finally:
        with _sink.lock:
            _sink.listeners.remove(fn)


# ---------------------------------------------------------------------------------------- the stage log

def log_path(out, stage: str) -> Path:
    return Path(out) / "logs" / f"{stage}.log"


class _Stage:
    handler: Optional[logging.FileHandler] = None
    attached: list = []
    terminal = None  # sys.stderr on a duplicate of the original descriptor 2, once fd 2 is redirected


_stage = _Stage()


def _redirect_fd2(target) -> Optional[int]:
    """Quiet mode in a plain process: what Ray's C++ core writes straight to descriptor 2 (its error-level
    lines, e.g. about actor constructor arguments) goes to the stage log; Python's sys.stderr (bars, notes,
    summaries, tracebacks) stays on the terminal. Returns the descriptor to restore, None if not done."""
    if verbose():
        return None
    if _stage.terminal is None:
        if sys.stderr is not sys.__stderr__:  # redirected by the caller (pytest's capture): leave it alone
            return None
        try:
            fd = sys.__stderr__.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        sys.stderr.flush()
        _stage.terminal = os.fdopen(os.dup(fd), "w", buffering=1, encoding=sys.__stderr__.encoding,
                                    errors="backslashreplace")
        sys.stderr = _stage.terminal
    elif sys.stderr is not _stage.terminal:
        return None
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    return saved


@contextlib.contextmanager
def stage_log(out, stage: str) -> Iterator[Path]:
    """Append everything of one stage to `<out>/logs/<stage>.log`: odsd's lines, the library loggers' records
    (Ray, Ray Data, Ray Train, DeepSpeed), Python warnings, and the output of Ray's worker processes."""
    path = log_path(out, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_FORMAT)
    handler.setLevel(logging.INFO)
    handler.stream.write(f"==== odsd {stage}: {' '.join(sys.argv)} ====\n")
    old = _stage.handler, _stage.attached, _sink.handler
    _stage.handler, _stage.attached = handler, []
    for lg in (logging.getLogger(), log):
        lg.addHandler(handler)
        _stage.attached.append(lg)
    with _sink.lock:
        _sink.handler = handler
    captured = not verbose()
    if captured:
        logging.captureWarnings(True)  # to the "py.warnings" logger -> root -> this file only
    quiet_libraries()
    saved_fd2 = _redirect_fd2(handler.stream)
    try:
        yield path
    finally:
        if saved_fd2 is not None:
            os.dup2(saved_fd2, 2)
            os.close(saved_fd2)
        if captured:
            logging.captureWarnings(False)
        with _sink.lock:
            _sink.handler = old[2]
        for lg in _stage.attached:
            lg.removeHandler(handler)
        _stage.handler, _stage.attached = old[0], old[1]
        handler.close()
