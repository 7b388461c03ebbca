"""Every manifest under k8s/ validates offline and follows the security policy.

KubeRay and Prometheus-operator kinds are validated against the CRD schemas in ../shared/schemas
(the openAPIV3Schema of their v1 version, with jsonschema); core kinds with kubernetes-validate.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas"
K8S_VERSION = "1.33.0"  # one of the versions kubernetes-validate ships

CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs() -> list[tuple[str, dict]]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


DOCS = load_docs()


def _id(item):
    fname, doc = item
    return f"{fname}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


VENDORED = ROOT / "tests" / "data" / "crds"  # gzip copies of the same files, for a clone without ../shared


def crd_schema(filename: str) -> dict:
    path = SCHEMAS / filename
    if path.is_file():
        text = path.read_text()
    else:
        import gzip

        text = gzip.decompress((VENDORED / f"{filename}.gz").read_bytes()).decode()
    crd = yaml.safe_load(text)
    for v in crd["spec"]["versions"]:
        if v["name"] == "v1":
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{filename}: no v1 version")


def strict(schema):
    """The schema with unknown fields rejected wherever Kubernetes would silently prune them (structural
    schemas: an object with `properties`, no `additionalProperties`, no x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    files = {p.name for p in manifest_files()}
    assert listed == files, f"not in kustomization: {sorted(files - listed)}; listed but missing: {sorted(listed - files)}"
    assert kust.get("namespace") == "odsd"


@pytest.mark.parametrize("item", DOCS, ids=_id)
def test_manifest_validates(item):
    fname, doc = item
    api, kind = doc.get("apiVersion"), doc.get("kind")
    assert api and kind, f"{fname}: a document without apiVersion/kind"
    if (api, kind) in CRD_FILES:
        import jsonschema

        schema = crd_schema(CRD_FILES[(api, kind)])
        validator = jsonschema.Draft202012Validator(strict(schema))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{fname} {kind}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
    else:
        import kubernetes_validate

        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            pytest.fail(f"{fname}: {api} {kind} is neither a known CRD nor a core kind of Kubernetes {K8S_VERSION}")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{fname} {kind}: {e}")


def _pod_specs(doc: dict):
    """(where, pod spec) of every pod template in a manifest."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for g in spec.get("workerGroupSpecs", []):
            yield f"worker group {g['groupName']}", g["template"]["spec"]
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from _pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield kind, spec["template"]["spec"]
    elif kind == "Pod":
        yield kind, spec


POD_DOCS = [d for d in DOCS if list(_pod_specs(d[1]))]


def test_there_are_pods_to_check():
    kinds = {d["kind"] for _, d in POD_DOCS}
    assert {"RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("item", POD_DOCS, ids=_id)
def test_pods_are_unprivileged_and_bounded(item):
    fname, doc = item
    for where, pod in _pod_specs(doc):
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            name = f"{fname} {where} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot not set"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{name}: runs as uid 0"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation must be false"
            assert not sc.get("privileged"), f"{name}: privileged"
            res = c.get("resources", {})
            for what in ("cpu", "memory"):
                assert what in res.get("requests", {}), f"{name}: no {what} request"
                assert what in res.get("limits", {}), f"{name}: no {what} limit"
    if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
        opts = doc["spec"].get("autoscalerOptions", {})
        assert opts.get("securityContext", {}).get("allowPrivilegeEscalation") is False
        assert opts.get("securityContext", {}).get("runAsNonRoot") is True
        assert opts.get("resources", {}).get("limits") and opts.get("resources", {}).get("requests")


def _by_kind(kind):
    return [d for _, d in DOCS if d["kind"] == kind]


def test_raycluster_groups_autoscaling_and_private_dashboard():
    (rc,) = _by_kind("RayCluster")
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head service (dashboard) must stay inside the cluster"
    assert not head.get("enableIngress", False)
    assert spec.get("enableInTreeAutoscaling") is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] > g["minReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"].get("nvidia.com/gpu"), "the GPU group asks for nvidia.com/gpu"
    for _, d in DOCS:  # nothing exposes the dashboard: no Ingress, no LoadBalancer/NodePort Service
        assert d["kind"] != "Ingress"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_rayjob_runs_odsd_with_the_configmap_config():
    (job,) = _by_kind("RayJob")
    assert job["spec"]["entrypoint"].startswith("odsd run --config ")
    cfg_path = job["spec"]["entrypoint"].split("--config ", 1)[1].split()[0]
    (rc,) = _by_kind("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    cms = {d["metadata"]["name"]: d for d in _by_kind("ConfigMap")}
    hits = [n for n, v in volumes.items() if "configMap" in v and cfg_path.startswith(mounts.get(n, "//") + "/")]
    assert hits, f"{cfg_path} is not on a ConfigMap mount of the head"
    cm = cms[volumes[hits[0]]["configMap"]["name"]]
    text = cm["data"][cfg_path.rsplit("/", 1)[1]]
    cfg = yaml.safe_load(text)
    assert cfg["ray"]["address"] == "auto"
    # checkpoint storage: the output folder is on the shared PVC
    pvcs = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    data = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") in pvcs]
    assert data and cfg["out"].startswith(mounts[data[0]] + "/")
    try:
        from odsd_dist.config import build_config
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"odsd_dist.config not importable: {e}")
    try:
        build_config(cfg)
    except ImportError as e:  # a stage's config class not written yet
        pytest.skip(f"stage config not importable yet: {e}")


def test_podmonitors_cover_head_and_workers():
    pms = _by_kind("PodMonitor")
    types = {pm["spec"]["selector"]["matchLabels"].get("ray.io/node-type") for pm in pms}
    assert {"head", "worker"} <= types
    (rc,) = _by_kind("RayCluster")
    head_ports = {p["name"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    for pm in pms:
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if pm["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "head":
                assert ep["port"] in head_ports
            else:
                for g in rc["spec"]["workerGroupSpecs"]:
                    assert ep["port"] in {p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}


def dashboard() -> dict:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "odsd-grafana-dashboard"]
    (text,) = cm["data"].values()
    return json.loads(text)


def test_dashboard_json_parses_and_has_the_panels():
    dash = dashboard()
    titles = {p["title"] for p in dash["panels"]}
    for t in ("Scoring images/s", "Damaged entries/s by reason", "Selected per class", "Train samples/s",
              "Loss terms", "Eval top-1 accuracy"):
        assert t in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["expr"].strip()


def test_prometheusrule_has_the_alerts():
    (pr,) = _by_kind("PrometheusRule")
    alerts = {r["alert"] for g in pr["spec"]["groups"] for r in g["rules"]}
    assert {"OdsdScoringStalled", "OdsdDamagedRateHigh", "OdsdTrainingLossNaN"} <= alerts
