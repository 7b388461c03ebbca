"""`ray job submit` of `odsd run` (demo config) to a 3-node local Ray cluster (cluster/local_cluster.py).

The job must succeed, and its teacher-scoring actors and its Ray Train workers must each have run on
at least two different nodes (read back from Ray's state API). The cluster is stopped afterwards:
only the processes it started (found by its own temp dir), never a plain `ray stop`.

Placement is forced by resources, not luck: every node has 2 logical CPUs, and the job asks for 2
scoring actors of 2 CPUs each and 2 training workers of 2 CPUs each, so no node can hold two.
Slow (minutes): it runs the whole demo pipeline on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops_helpers import ROOT, local_cluster, local_ray_cluster

DEMO = ROOT / "odsd_dist" / "configs" / "demo.yaml"
JOB_TIMEOUT_S = int(os.environ.get("ODSD_CLUSTER_JOB_TIMEOUT", "2400"))


def _demo_paths() -> dict:
    import yaml

    return yaml.safe_load(DEMO.read_text())


def _teacher(tmp: Path) -> str:
    """The demo teacher when it has been trained (runs/demo/teacher), else a random one of the same shape."""
    cfg = _demo_paths()
    trained = ROOT / cfg["teacher"]["weights"]
    if trained.is_file():
        return str(trained)
    from fixtures import make_teacher

    names = None
    for shards in cfg.get("eval", {}).get("shards", []):
        for cj in (ROOT / shards / "classes.json", ROOT / shards / ".." / "classes.json"):
            if names is None and cj.is_file():
                names = json.loads(cj.read_text())
                names = names if isinstance(names, list) else list(names)
    return make_teacher(tmp / "teacher.safetensors", arch="resnet8", class_names=names)


def entrypoint(config: str, overrides: list[str]) -> list[str]:
    """`odsd run ...` when the package is installed next to this Python, else the same via -m."""
    odsd = Path(sys.executable).parent / "odsd"
    head = ["odsd"] if odsd.exists() else ["python", "-m", "odsd_dist.cli"]
    cmd = head + ["run", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory):
    if not DEMO.is_file():
        pytest.skip(f"{DEMO.relative_to(ROOT)} not written yet")
    cfg = _demo_paths()
    missing = [p for p in cfg["score"]["shards"] + cfg.get("eval", {}).get("shards", []) if not (ROOT / p).exists()]
    if missing:
        pytest.skip(f"demo shards missing: {missing}")
    tmp = tmp_path_factory.mktemp("cluster_job")
    teacher = _teacher(tmp)
    out = tmp / "runs"
    overrides = [
        f"out={out}",                       # runs/ is not uploaded with the working dir: write next to the test
        f"teacher.weights={teacher}",
        # Absolute shard paths: on this one machine every node sees them. (Relative paths resolve in the
        # uploaded working dir; in one run its shards vanished from the driver's cwd between sample and
        # distill, see docs/RUNNING_RAY_JOB.md.)
        f"score.shards=[{', '.join(str(ROOT / p) for p in cfg['score']['shards'])}]",
        f"eval.shards=[{', '.join(str(ROOT / p) for p in cfg.get('eval', {}).get('shards', []))}]",
        "score.actors=2", "score.actor_cpus=2",        # 2 actors x 2 CPUs on 2-CPU nodes: two nodes
        "distill.workers=2", "distill.worker_cpus=2",  # likewise for the Ray Train workers
        "distill.steps=4", "distill.batch_size=16", "distill.checkpoint_every=2",
        "sample.n=200",
    ]
    with local_ray_cluster(workers=2, cpus_per_node=2) as (spec, state):
        env = dict(os.environ, RAY_ADDRESS=spec.dashboard_url, **local_cluster.client_env(spec))
        ray_bin = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else shutil.which("ray")
        submit = [ray_bin, "job", "submit", "--address", spec.dashboard_url, "--no-wait",
                  "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--working-dir", ".",
                  "--", *entrypoint("odsd_dist/configs/demo.yaml", overrides)]
        r = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
        sub_id = next((w.strip("'\"") for line in r.stdout.splitlines() + r.stderr.splitlines()
                       for w in line.split() if w.strip("'\"").startswith("raysubmit_")), None)
        assert sub_id, f"no submission id in:\n{r.stdout}\n{r.stderr}"

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(spec.dashboard_url)
        deadline = time.time() + JOB_TIMEOUT_S
        status = None
        while time.time() < deadline:
            status = client.get_job_status(sub_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(5)
        logs = client.get_job_logs(sub_id)
        if status != JobStatus.SUCCEEDED:
            if status not in (JobStatus.FAILED, JobStatus.STOPPED):
                client.stop_job(sub_id)
            pytest.fail(f"job {sub_id} ended {status}:\n{logs[-8000:]}")

        from ray.util.state import list_actors

        fields = ("class_name", "repr_name", "name", "node_id", "state", "pid")
        actors = [a if isinstance(a, dict) else {k: getattr(a, k, None) for k in fields} for a in
                  list_actors(address=spec.dashboard_url, limit=10000, detail=True, raise_on_missing_output=False)]
        nodes = {n["name"]: n["node_id"] for n in state["nodes"]}
        yield {"spec": spec, "state": state, "logs": logs, "actors": actors, "nodes": nodes, "out": out,
               "submission_id": sub_id}


def _nodes_of(actors: list[dict], pred) -> set[str]:
    return {a["node_id"] for a in actors if pred(a) and a.get("node_id")}


def _desc(a: dict) -> str:
    return f"{a.get('class_name')} {a.get('repr_name') or ''} {a.get('name') or ''}"


def test_job_succeeded_and_wrote_every_stage(demo_job):
    for stage in ("score", "sample", "distill", "eval"):
        assert (demo_job["out"] / stage / "done.json").is_file(), f"{stage}/done.json missing; logs:\n{demo_job['logs'][-4000:]}"


def test_scoring_actors_ran_on_two_nodes(demo_job):
    nodes = _nodes_of(demo_job["actors"], lambda a: "TeacherScorer" in _desc(a))
    assert len(nodes) >= 2, f"scoring actors on {len(nodes)} node(s): " + \
        json.dumps([(_desc(a), a.get("node_id")) for a in demo_job["actors"]], indent=1)


def test_training_workers_ran_on_two_nodes(demo_job):
    nodes = _nodes_of(demo_job["actors"], lambda a: "RayTrainWorker" in _desc(a))
    assert len(nodes) >= 2, f"training workers on {len(nodes)} node(s): " + \
        json.dumps([(_desc(a), a.get("node_id")) for a in demo_job["actors"]], indent=1)


def test_cluster_had_three_nodes(demo_job):
    assert len([n for n in demo_job["nodes"].values() if n]) == 3


def test_down_stops_only_its_own_processes():
    """`down` stops every process of the cluster it started (found by its temp dir) and nothing else."""
    import psutil

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # not ours to stop
    try:
        with local_ray_cluster(workers=1, cpus_per_node=1) as (spec, state):
            pids = {p.pid for p in local_cluster.cluster_processes(spec.temp_dir)}
            assert set(state["pids"]) and set(state["pids"]) <= pids | set(state["pids"])
            assert len(state["nodes"]) == 2 and all(n["node_id"] for n in state["nodes"])
        assert not local_cluster.cluster_processes(spec.temp_dir)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"still running after down: {left}"
        assert bystander.poll() is None, "down stopped a process that was not part of the cluster"
    finally:
        bystander.kill()
        bystander.wait()
