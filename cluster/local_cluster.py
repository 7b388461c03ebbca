#!/usr/bin/env python3
"""A multi-node Ray cluster on one machine: a head and N worker nodes started with `ray start`.

Every node gets its own ports and a custom resource named after it ("head", "worker1", "worker2", ...)
so work can be pinned to a node (`resources={"worker1": 0.01}`). `down` stops only the processes this
cluster started (found by its own temp dir and their children), never every Ray on the machine the
way a plain `ray stop` would.

    python cluster/local_cluster.py up      [--base-port 27000] [--workers 2] [--cpus-per-node 2]
    python cluster/local_cluster.py status  [--base-port 27000]
    python cluster/local_cluster.py down    [--base-port 27000]
    eval "$(python cluster/local_cluster.py env [--base-port 27000])"   # RAY_ADDRESS + token for clients

Token authentication is on, with the cluster's own token in <temp dir>/auth_token (mode 0600): clients
need RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, which `env` prints.

Port layout, from the base port B (all on 127.0.0.1):
    B      GCS (the address workers and drivers join: 127.0.0.1:B)
    B+1    dashboard + job server (`ray job submit --address http://127.0.0.1:B+1`)
    B+2    (reserved: Ray client server, when ray[client] is installed)
    B+10+10*i ... B+15+10*i   node i: node manager, object manager, metrics export (Prometheus),
                              dashboard agent http, dashboard agent grpc, runtime-env agent
    B+1000+200*i ... +199     node i: worker ports
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_BASE_PORT = 27000
STATE_FILE = "odsd-cluster.json"


@dataclass
class NodeSpec:
    name: str  # also the node's custom resource
    index: int
    base_port: int
    num_cpus: int
    head: bool = False

    def port(self, offset: int) -> int:
        return self.base_port + 10 + 10 * self.index + offset

    @property
    def node_manager_port(self) -> int:
        return self.port(0)

    @property
    def object_manager_port(self) -> int:
        return self.port(1)

    @property
    def metrics_export_port(self) -> int:
        return self.port(2)

    @property
    def dashboard_agent_listen_port(self) -> int:
        return self.port(3)

    @property
    def dashboard_agent_grpc_port(self) -> int:
        return self.port(4)

    @property
    def runtime_env_agent_port(self) -> int:
        return self.port(5)

    @property
    def worker_ports(self) -> tuple[int, int]:
        lo = self.base_port + 1000 + 200 * self.index
        return lo, lo + 199


@dataclass
class ClusterSpec:
    base_port: int = DEFAULT_BASE_PORT
    workers: int = 2
    cpus_per_node: int = 2
    object_store_mb: int = 200
    temp_dir: Optional[str] = None
    nodes: list[NodeSpec] = field(default_factory=list)

    def __post_init__(self):
        if self.temp_dir is None:
            # Short: Ray puts unix sockets under it and socket paths are limited to ~107 bytes.
            self.temp_dir = f"/tmp/odsd-ray-{self.base_port}"
        if not self.nodes:
            self.nodes = [NodeSpec("head", 0, self.base_port, self.cpus_per_node, head=True)] + [
                NodeSpec(f"worker{i}", i, self.base_port, self.cpus_per_node) for i in range(1, self.workers + 1)
            ]

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    @property
    def dashboard_port(self) -> int:
        return self.base_port + 1

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def client_port(self) -> int:
        return self.base_port + 2

    @property
    def metrics_targets(self) -> list[str]:
        return [f"127.0.0.1:{n.metrics_export_port}" for n in self.nodes]

    @property
    def state_path(self) -> Path:
        return Path(self.temp_dir) / STATE_FILE


def _ray_bin() -> str:
    """The `ray` next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def token_path(spec: "ClusterSpec") -> Path:
    return Path(spec.temp_dir) / "auth_token"


def client_env(spec: "ClusterSpec") -> dict:
    """Environment variables a client of this cluster needs (drivers, `ray job submit`, `ray status`):
    the cluster's own token, so a shared ~/.ray/auth_token (or its absence) does not matter."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path(spec))}


def _write_token(spec: "ClusterSpec") -> None:
    import secrets

    path = token_path(spec)
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))


def _node_env(spec: Optional["ClusterSpec"] = None) -> dict:
    env = dict(os.environ)
    env.pop("RAY_AUTH_TOKEN", None)
    if spec is not None:
        env.update(client_env(spec))
    # Job drivers inherit the raylet's PATH: keep this Python's bin (and its `odsd`) first on it.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A loaded machine (shared CI, 2 cores) starts the dashboard slowly: Ray's 60 s default is too short.
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    env.pop("RAY_ADDRESS", None)
    return env


def start_command(spec: ClusterSpec, node: NodeSpec) -> list[str]:
    lo, hi = node.worker_ports
    cmd = [
        _ray_bin(), "start",
        "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(node.num_cpus),
        "--num-gpus", "0",
        "--resources", json.dumps({node.name: 1}),
        "--object-store-memory", str(spec.object_store_mb * 1024 * 1024),
        "--temp-dir", spec.temp_dir,
        "--node-manager-port", str(node.node_manager_port),
        "--object-manager-port", str(node.object_manager_port),
        "--metrics-export-port", str(node.metrics_export_port),
        "--dashboard-agent-listen-port", str(node.dashboard_agent_listen_port),
        "--dashboard-agent-grpc-port", str(node.dashboard_agent_grpc_port),
        "--runtime-env-agent-port", str(node.runtime_env_agent_port),
        "--min-worker-port", str(lo),
        "--max-worker-port", str(hi),
        "--disable-usage-stats",
    ]
    if node.head:
        cmd += [
            "--head",
            "--port", str(spec.base_port),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",  # the job server: local only
            "--dashboard-port", str(spec.dashboard_port),
        ]
    else:
        cmd += ["--address", spec.gcs_address]
    return cmd


# ---------------------------------------------------------------- processes of this cluster only


def cluster_processes(temp_dir: str) -> list:
    """Processes of the cluster rooted at `temp_dir`: every process whose command line names the temp
    dir (gcs_server, raylets, agents, dashboard, log monitor) plus all their descendants (workers,
    whose titles are rewritten to `ray::...`, and job drivers)."""
    import psutil

    roots = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.info["pid"] != me and temp_dir in cmd:
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_processes(temp_dir: str, grace_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`, every process of this cluster; returns how many."""
    import psutil

    procs = cluster_processes(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # Children forked while we waited (a worker starting up) are caught by a second sweep.
    alive = {p.pid: p for p in alive}
    for p in cluster_processes(temp_dir):
        alive.setdefault(p.pid, p)
    for p in alive.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(alive.values()), timeout=5)
    return len(procs)


# ---------------------------------------------------------------- up / down / status


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait_nodes(spec: ClusterSpec, n: int, timeout_s: float = 120.0) -> list[dict]:
    """Wait until `n` nodes are alive in the GCS (queried in a subprocess: no driver left behind)."""
    code = (
        "import json, ray\n"
        f"ray.init(address={spec.gcs_address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([{'node_id': x['NodeID'], 'alive': x['Alive'], 'resources': x['Resources']}"
        " for x in ray.nodes()]))\n"
    )
    deadline = time.time() + timeout_s
    nodes: list[dict] = []
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_node_env(spec), timeout=120)
        if r.returncode == 0:
            nodes = json.loads(r.stdout.strip().splitlines()[-1])
            if sum(1 for x in nodes if x["alive"]) >= n:
                return nodes
        time.sleep(1)
    raise TimeoutError(f"only {sum(1 for x in nodes if x['alive'])} of {n} Ray nodes came up in {timeout_s}s")


def up(spec: ClusterSpec, wait: bool = True, attempts: int = 2) -> dict:
    """Start the head, then the workers; write the state file; return it. On a loaded machine a node
    can time out while starting: everything started is stopped and the whole start is retried."""
    for attempt in range(1, attempts + 1):
        try:
            return _up_once(spec, wait)
        except (RuntimeError, TimeoutError) as e:
            if attempt == attempts or "already running" in str(e) or "ports in use" in str(e):
                raise
            print(f"local_cluster: start failed ({e}); retrying", file=sys.stderr)
            stop_processes(spec.temp_dir)
            time.sleep(2)
    raise AssertionError("unreachable")


def _up_once(spec: ClusterSpec, wait: bool) -> dict:
    if cluster_processes(spec.temp_dir):
        raise RuntimeError(f"a cluster with temp dir {spec.temp_dir} is already running: run `down` first")
    busy = [p for p in (spec.base_port, spec.dashboard_port, spec.client_port) if not _port_free(p)]
    busy += [n.metrics_export_port for n in spec.nodes if not _port_free(n.metrics_export_port)]
    if busy:
        raise RuntimeError(f"ports in use: {busy}; pick another --base-port")
    Path(spec.temp_dir).mkdir(parents=True, exist_ok=True)
    _write_token(spec)  # token authentication with this cluster's own token
    env = _node_env(spec)
    log = open(Path(spec.temp_dir) / "odsd-cluster-start.log", "ab")
    try:
        for node in spec.nodes:
            cmd = start_command(spec, node)
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=420)
            if r.returncode != 0:
                raise RuntimeError(f"`ray start` for {node.name} failed (exit {r.returncode}); see {log.name}")
    except BaseException:
        log.close()
        stop_processes(spec.temp_dir)
        raise
    log.close()
    try:
        nodes = _wait_nodes(spec, len(spec.nodes)) if wait else []
    except BaseException:
        stop_processes(spec.temp_dir)
        raise
    state = {
        "gcs_address": spec.gcs_address,
        "dashboard_url": spec.dashboard_url,
        "temp_dir": spec.temp_dir,
        "client_env": client_env(spec),
        "metrics_targets": spec.metrics_targets,
        "nodes": [
            {**asdict(n), "metrics_export_port": n.metrics_export_port,
             "node_id": next((x["node_id"] for x in nodes if n.name in x["resources"]), None)}
            for n in spec.nodes
        ],
        "pids": sorted(p.pid for p in cluster_processes(spec.temp_dir)),
    }
    spec.state_path.write_text(json.dumps(state, indent=1))
    return state


def down(spec: ClusterSpec) -> int:
    n = stop_processes(spec.temp_dir)
    return n


def status(spec: ClusterSpec) -> dict:
    procs = cluster_processes(spec.temp_dir)
    state = json.loads(spec.state_path.read_text()) if spec.state_path.is_file() else {}
    out = {"running": bool(procs), "processes": len(procs), **state}
    if procs:
        try:
            out["nodes_alive"] = sum(1 for x in _wait_nodes(spec, 0, timeout_s=30) if x["alive"])
        except Exception as e:  # noqa: BLE001 - status must not fail
            out["nodes_alive"] = f"unknown ({e.__class__.__name__})"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="local_cluster.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status", "env"])
    ap.add_argument("--base-port", type=int, default=int(os.environ.get("ODSD_CLUSTER_PORT", DEFAULT_BASE_PORT)))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per node (Ray's count, not cores)")
    ap.add_argument("--object-store-mb", type=int, default=200)
    ap.add_argument("--temp-dir", default=None)
    args = ap.parse_args(argv)
    spec = ClusterSpec(args.base_port, args.workers, args.cpus_per_node, args.object_store_mb, args.temp_dir)
    if args.action == "up":
        st = up(spec)
        print(json.dumps({k: st[k] for k in ("gcs_address", "dashboard_url", "metrics_targets", "temp_dir")}, indent=1))
        print(f"\nclient env:    eval \"$({sys.argv[0]} env --base-port {spec.base_port})\"")
        print("submit a job:  ray job submit --working-dir . -- odsd run --config ...")
        print(f"stop:          {sys.argv[0]} down --base-port {spec.base_port}")
    elif args.action == "down":
        n = down(spec)
        print(f"stopped {n} processes of the cluster in {spec.temp_dir}")
    elif args.action == "env":
        print(f"export RAY_ADDRESS={spec.dashboard_url}")
        for k, v in client_env(spec).items():
            print(f"export {k}={v}")
    else:
        st = status(spec)
        print(json.dumps(st, indent=1))
        return 0 if st["running"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
