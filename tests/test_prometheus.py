"""A real Prometheus scrapes a real `odsd` run on a local Ray node; every PromQL expression of the
Grafana dashboard must return data and every PrometheusRule expression must parse.

Prometheus is Debian's `prometheus` package (installed with apt-get when missing and we are root).
The run is `odsd run` when every stage is importable, else `odsd score` alone (panels of stages that
did not run are skipped with the reason). Ray exports `ray.util.metrics` through the node's metrics
agent (`--metrics-export-port`); the driver exports its own metrics with prometheus_client
(`metrics.port`); Prometheus scrapes both every second.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from fixtures import class_names, make_labelled_shards, make_pool_shards, make_teacher
from ops_helpers import ROOT, free_port, local_ray_cluster

RATE_WINDOW = "1m"  # what $__rate_interval becomes here (scrape interval 1 s)
STAGES = ("score", "sample", "distill", "eval")


def _k8s_doc(fname: str, kind: str) -> dict:
    for doc in yaml.safe_load_all((ROOT / "k8s" / fname).read_text()):
        if doc and doc["kind"] == kind:
            return doc
    raise AssertionError(f"no {kind} in k8s/{fname}")


def dashboard_exprs() -> list[tuple[str, str]]:
    cm = _k8s_doc("grafana-dashboard.yaml", "ConfigMap")
    dash = json.loads(next(iter(cm["data"].values())))
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"{p['title']} [{t['refId']}]", t["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    pr = _k8s_doc("prometheusrule.yaml", "PrometheusRule")
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in pr["spec"]["groups"] for r in g["rules"]]


def concrete(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("${__rate_interval}", RATE_WINDOW)


def stage_of(expr: str) -> str:
    m = re.search(r"odsd_(score|sample|distill|eval)_", expr)
    return m.group(1) if m else "ray"


def _stage_importable(stage: str) -> bool:
    mod = {"eval": "odsd_dist.evaluate"}.get(stage, f"odsd_dist.{stage}")
    try:
        importlib.import_module(mod)
        return True
    except ImportError:
        return False


def prometheus_binary() -> str:
    exe = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("prometheus is not installed and cannot be installed here (needs root and apt-get): "
                    "apt-get install -y prometheus")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
                           capture_output=True, text=True, env=env, timeout=600)
    exe = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if not exe:
        pytest.skip(f"apt-get install prometheus failed: {r.stderr[-500:]}")
    return exe


class Prometheus:
    """One Prometheus server on a free localhost port with its own TSDB; stops only itself."""

    def __init__(self, exe: str, folder: Path, targets: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "odsd", "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(folder / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422: a bad expression; the body says why
            return json.loads(e.read())

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("prometheus not ready")

    def targets_up(self) -> dict:
        res = self.api("targets")
        return {t["scrapeUrl"]: t["health"] for t in res["data"]["activeTargets"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """Prometheus scraping a 1-node local Ray that ran odsd (score, or all stages); yields the facts."""
    exe = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prom")
    pool = make_pool_shards(tmp / "pool", n_shards=2, per_shard=40, damage=True, seed=0)
    labelled = make_labelled_shards(tmp / "labelled", n_classes=3, per_class=10, size=32, seed=1)
    teacher = make_teacher(tmp / "teacher.safetensors", arch="resnet8", class_names=class_names(3))
    stages = [s for s in STAGES if _stage_importable(s)]
    full = stages == list(STAGES) and _stage_importable("pipeline")
    env = {"RAY_metrics_report_interval_ms": "1000"}  # actors report to the node agent every second
    with local_ray_cluster(workers=0, cpus_per_node=2, env=env) as (spec, state):
        driver_port = free_port()
        cfg = {
            "seed": 0, "out": str(tmp / "runs"),
            "ray": {"address": spec.gcs_address},
            "teacher": {"weights": teacher},
            "score": {"shards": [str(p) for p in pool["paths"]], "batch_size": 8, "decode_batch_size": 8,
                      "actors": 1, "actor_cpus": 1, "decode_cpus": 0.5},
            "eval": {"shards": [str(labelled["folder"])]},
            "metrics": {"port": driver_port},
        }
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        targets = state["metrics_targets"] + [f"127.0.0.1:{driver_port}"]
        prom = Prometheus(exe, tmp / "prometheus", targets)
        try:
            prom.wait_ready()
            t0 = time.time()
            cmd = [sys.executable, "-m", "odsd_dist.cli", "run" if full else "score", "--config", str(cfg_path)]
            if full:
                # A tiny sample/distill/eval so that every panel gets data in a short run.
                for o in ("sample.n=30", "distill.workers=1", "distill.steps=4", "distill.batch_size=8",
                          "distill.log_every=1", "distill.checkpoint_every=2", "distill.data_cpus=0.25",
                          "distill.eval_batch_size=32"):
                    cmd += ["--set", o]
            run_env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=spec.gcs_address)
            log_path = tmp / "odsd.log"
            with open(log_path, "w") as log:
                r = subprocess.run(cmd, cwd=ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   timeout=1200)
            if r.returncode != 0:
                lines = [ln for ln in log_path.read_text().splitlines()
                         if "logging_progress" not in ln and "streaming_executor" not in ln]
                pytest.fail(f"{' '.join(cmd)} failed (exit {r.returncode}); full log {log_path}:\n" + "\n".join(lines[-80:]))
            # Actor metrics stay exported by the node's agent after the run; wait until Prometheus has them.
            deadline = time.time() + 90
            while time.time() < deadline:
                got = prom.api("query", query="sum(ray_odsd_score_images_scored_total)")
                if got["status"] == "success" and got["data"]["result"]:
                    break
                time.sleep(1)
            time.sleep(5)  # a few more scrapes, so rate() windows hold several samples
            yield {"prom": prom, "start": t0 - 5, "end": time.time(), "stages": stages if full else ["score"],
                   "log": log_path, "targets": prom.targets_up()}
        finally:
            prom.stop()


@pytest.mark.parametrize("title,expr", dashboard_exprs(), ids=[t for t, _ in dashboard_exprs()])
def test_dashboard_query_returns_data(scraped_run, title, expr):
    stage = stage_of(expr)
    if stage != "ray" and stage not in scraped_run["stages"]:
        pytest.skip(f"stage {stage!r} did not run here (not implemented yet or `odsd run` unavailable)")
    prom = scraped_run["prom"]
    q = concrete(expr)
    res = prom.api("query_range", query=q, start=scraped_run["start"], end=scraped_run["end"], step="1s")
    assert res["status"] == "success", f"{title}: {q}: {res.get('error')}"
    assert res["data"]["result"], f"{title}: no data for {q}\ntargets: {scraped_run['targets']}"


@pytest.mark.parametrize("alert,expr", rule_exprs(), ids=[a for a, _ in rule_exprs()])
def test_rule_expression_parses(scraped_run, alert, expr):
    res = scraped_run["prom"].api("query", query=expr)
    assert res["status"] == "success", f"{alert}: {res.get('errorType')}: {res.get('error')}"


def test_scorer_actor_name_matches_the_stall_rule(scraped_run):
    """OdsdScoringStalled looks for live TeacherScorer actors in ray_actors: the name must match."""
    prom = scraped_run["prom"]
    res = prom.api("query_range", query='ray_actors{Name=~".*TeacherScorer.*"}', start=scraped_run["start"],
                   end=scraped_run["end"], step="1s")
    assert res["status"] == "success" and res["data"]["result"], \
        "no ray_actors series named like TeacherScorer: fix the Name matcher in k8s/prometheusrule.yaml"
