"""Peak-RSS sampling of a process tree (a command and every Ray process it starts), by role.

Two figures per process: `rss` (everything resident, including pages of Ray's shared-memory object
store that the process has mapped and touched) and `anon` (RssAnon: the process's own heap, what it
alone holds). A worker that reads many blocks from the object store shows more `rss` without owning
more memory, so growth is judged on both."""
from __future__ import annotations

import subprocess
import threading
import time

import psutil


def role_of(cmdline: list[str]) -> str:
    s = " ".join(cmdline)
    if "ray::" in s or "default_worker.py" in s:
        if "MapWorker" in s or "Scorer" in s or "Trainer" in s or "Worker(" in s:
            return "actor"
        return "ray_worker"
    if "raylet" in s or "gcs_server" in s or "dashboard" in s or "log_monitor" in s or "monitor.py" in s:
        return "ray_system"
    return "other"


def _rss_anon(pid: int) -> int:
    """RssAnon of /proc/<pid>/status in bytes (0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeRSS:
    """Polls a process and its descendants every `interval` s; keeps the peak RSS of each process."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, tuple[str, str, int]] = {}
        self.anon: dict[int, int] = {}
        self.cpu: dict[int, float] = {}  # last seen user+system CPU-seconds of each process
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, p: psutil.Process, role: str) -> None:
        try:
            rss = p.memory_info().rss
            name = " ".join(p.cmdline())[:120]
            anon = _rss_anon(p.pid)
            t = p.cpu_times()
            self.cpu[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        old = self.peaks.get(p.pid)
        if role != "driver":
            role = role_of(name.split())
        if old is None or rss > old[2]:
            self.peaks[p.pid] = (role, name, rss)
        self.anon[p.pid] = max(self.anon.get(p.pid, 0), anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample(self.root, "driver")
            try:
                kids = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                kids = []
            for k in kids:
                self._sample(k, "")
            self._stop.wait(self.interval)

    def start(self) -> "TreeRSS":
        self._t.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        by_role: dict[str, list[tuple[int, int]]] = {}
        for pid, (role, _, rss) in self.peaks.items():
            by_role.setdefault(role, []).append((rss, self.anon.get(pid, 0)))
        return {role: {"max_mb": max(r for r, _ in v) / 2**20, "max_anon_mb": max(a for _, a in v) / 2**20,
                       "count": len(v)} for role, v in by_role.items()}


def run_measured(cmd: list[str], env=None, cwd=None) -> tuple[int, float, dict, str]:
    """Run a command; return (exit code, wall seconds, peak RSS by role, combined output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeRSS(proc.pid).start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    return proc.returncode, wall, mon.stop(), out


def run_measured_cpu(cmd: list[str], env=None, cwd=None) -> tuple[int, float, dict, str, float]:
    """run_measured plus the CPU-seconds of the whole tree (each process as last polled: a process that
    ends between two polls loses at most one interval of its CPU)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeRSS(proc.pid, interval=0.2).start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    peaks = mon.stop()
    return proc.returncode, wall, peaks, out, sum(mon.cpu.values())
