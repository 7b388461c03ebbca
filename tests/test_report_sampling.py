"""`odsd report sampling`: the page is self-contained, a real headless browser renders every plot, the
near-neighbour share is judged only where the provenance can judge, and bad inputs exit 2."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.synth import make_score_tables, synthetic_class_map
from odsd_dist.cli import main
from odsd_dist.config import build_config
from odsd_dist.report.classmap import CIFAR10_CLASSES, CIFAR10_TINYIMAGENET, load_class_map
from odsd_dist.report.precision import near_neighbour_precision


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    try:  # Debian: install it once (the test skips only when that is impossible)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900)
        if r.returncode == 0:
            return shutil.which("chromium")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def _browser(chromium: str, tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chrome-profile'}", *extra, url],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)


@pytest.fixture(scope="module")
def selections(tmp_path_factory, ray_local):
    from odsd_dist.sample import run_sample

    root = tmp_path_factory.mktemp("report")
    # feature_dim 64 = the test teacher's (resnet8), so its reference features share the map
    info = make_score_tables(root / "score", rows=4000, num_classes=4, feature_dim=64, shards=2, seed=11,
                             class_names=["cat", "dog", "ship", "frog"])
    out = {}
    for method in ("aps", "maxprob"):
        cfg = build_config({"out": str(root), "sample": {"method": method, "n": 800, "scores": str(root / "score"),
                                                          "batch_rows": 1024, "out": str(root / method)}})
        out[method] = run_sample(cfg)["selection"]
    cmap = root / "class_map.json"
    cmap.write_text(json.dumps(synthetic_class_map(info["class_names"])))
    return root, out, cmap


def test_report_renders_in_headless_chromium(selections, labelled_shards, tmp_path, capsys):
    from fixtures import make_teacher

    root, sel, cmap = selections
    teacher = make_teacher(tmp_path / "teacher.safetensors", class_names=["cat", "dog", "ship", "frog"])
    html_path = tmp_path / "report.html"
    rc = main(["report", "sampling", "--selection", sel["aps"], "--compare", sel["maxprob"],
               "--provenance", str(root / "score" / "provenance.parquet"), "--class-map", str(cmap),
               "--reference", labelled_shards["folder"], "--teacher", teacher, "--reference-n", "40",
               "--max-points", "600", "--tsne-iters", "250", "--out", str(html_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "near-neighbour precision aps" in out and "aps (aps) minus maxprob (maxprob):" in out
    assert "640 map points" in out  # 600 pool points + 40 reference images
    page = html_path.read_text()
    assert "Reference: 40 original-domain images scored by the teacher" in page
    imgs = re.findall(r'<img class="plot" id="([^"]+)"[^>]*src="data:image/png;base64,', page)
    assert imgs == ["plot-classes", "plot-scores", "plot-map", "plot-precision"]
    assert "http://" not in page and "https://" not in page.replace("https://synthetic.example", "")  # self-contained
    # on the synthetic pool APS keeps more in-domain (near-neighbour) rows than maxprob
    prec = dict(re.findall(r"near-neighbour precision (\w+) \(\w+\): ([\d.]+)%", out))
    assert float(prec["aps"]) > float(prec["maxprob"])

    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium and `apt-get install -y chromium` failed: cannot check the page in a browser")
    url = html_path.resolve().as_uri()
    shot = tmp_path / "out.png"
    r = _browser(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1400,3000")
    assert shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert im.shape == (3000, 1400) and im.std() > 10 and (im < 128).mean() > 0.01  # not blank
    shutil.copy(shot, Path("/tmp/odsd_report_screenshot.png"))  # for a person to look at
    dom = _browser(chromium, tmp_path, url, "--dump-dom", "--virtual-time-budget=5000").stdout
    tags = re.findall(r"<img [^>]*>", dom)
    assert len(tags) == 4
    for tag in tags:
        w = int(re.search(r'data-natural-width="(\d+)"', tag).group(1))
        h = int(re.search(r'data-natural-height="(\d+)"', tag).group(1))
        assert w > 100 and h > 100, tag[:200]
    assert 'data-plots-loaded="4/4"' in dom


def test_report_bad_inputs_exit_2(selections, tmp_path, capsys):
    root, sel, cmap = selections
    assert main(["report", "sampling", "--selection", str(tmp_path / "none.parquet")]) == 2
    assert "selection not found" in capsys.readouterr().err
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"not-a-class": ["x"]}))
    assert main(["report", "sampling", "--selection", sel["aps"], "--class-map", str(bad)]) == 2
    assert "unknown teacher classes" in capsys.readouterr().err
    prov = str(root / "score" / "provenance.parquet")
    # the built-in CIFAR-10 map does not fit a cat/dog/ship/frog teacher; no map at all is an error too
    assert main(["report", "sampling", "--selection", sel["aps"], "--class-map", "cifar10-tinyimagenet"]) == 2
    assert "the teacher has no classes" in capsys.readouterr().err
    assert main(["report", "sampling", "--selection", sel["aps"], "--provenance", prov]) == 2
    assert "pass --class-map" in capsys.readouterr().err
    junk = tmp_path / "prov.parquet"
    junk.write_bytes(b"PAR1 not really")
    assert main(["report", "sampling", "--selection", sel["aps"], "--provenance", str(junk), "--class-map", str(cmap)]) == 2
    assert "not a provenance table" in capsys.readouterr().err


def test_near_neighbour_share_counts_only_judged_rows():
    import pyarrow as pa

    names = ["cat", "dog"]
    sel = pa.table({"key": ["a", "b", "c", "d", "e"], "pred": pa.array([0, 0, 0, 1, 1], pa.int32())})
    prov = pa.table({"key": ["a", "b", "c", "d", "e", "f"], "source": ["t"] * 6,
                     "source_class": ["tabby", "goldfish", None, "tabby", None, "tabby"]})
    r = near_neighbour_precision(sel, prov, names, {"cat": ["tabby"], "dog": ["Chihuahua"]})
    assert (r["hits"], r["counted"], r["unjudged"]) == (1, 3, 2)  # c and e have no source class
    assert r["per_class"] == {"cat": 0.5, "dog": 0.0} and r["overall"] == pytest.approx(1 / 3)
    r = near_neighbour_precision(sel, prov, names, {"cat": ["tabby"], "dog": []})  # dog: no neighbours, left out
    assert (r["hits"], r["counted"]) == (1, 2) and "dog" not in r["per_class"]


def test_builtin_cifar10_tinyimagenet_map():
    assert tuple(CIFAR10_TINYIMAGENET) == CIFAR10_CLASSES
    assert load_class_map(None, list(CIFAR10_CLASSES)) is CIFAR10_TINYIMAGENET  # picked by the class names
    assert load_class_map(None, ["cat", "dog"]) is None
    assert {"tabby", "n02123045", "Persian cat"} <= set(CIFAR10_TINYIMAGENET["cat"])
    assert "police van" in CIFAR10_TINYIMAGENET["automobile"] and "police van" in CIFAR10_TINYIMAGENET["truck"]
    assert CIFAR10_TINYIMAGENET["airplane"] == []  # Tiny ImageNet has no airplane: left out of the share
