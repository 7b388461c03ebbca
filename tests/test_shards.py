"""Shards: safe decoding of every damage kind, tar reading, verify, build round-trips, labelled loading."""
from __future__ import annotations

import io
import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import NOT_IMAGE, PSD_HEADER, bomb_png, make_pool_shards, shape_image
from odsd_dist.errors import UserError
from odsd_dist.shards import (Damaged, ShardReadError, decode_batch, decode_image, iter_samples, load_labelled,
                              pick_image, verify_shards)
from odsd_dist.shards.build import build_from_arrays, build_from_folder
from odsd_dist.shards.labelled import iter_labelled_batches
from odsd_dist.shards.writer import MTIME, ShardWriter, TarWriter

DATA = Path(__file__).parent / "data"


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return shape_image(0, 40, np.random.default_rng(0))


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_decode_intact_formats(rgb, fmt, ext):
    out = decode_image(_encode(rgb, fmt), ext, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    grey = decode_image(_encode(rgb, fmt), ext, 24, channels=1)
    assert grey.shape == (24, 24, 1)


def test_decode_grey_to_rgb_and_lossless(rgb):
    g = np.asarray(Image.fromarray(rgb).convert("L"))
    out = decode_image(_encode(g, "PNG"), "png", 40, channels=3)
    assert out.shape == (40, 40, 3)
    assert (out[..., 0] == g).all() and (out[..., 1] == g).all()  # same size: no resampling, exact


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_decode_truncated_is_not_padded(rgb, fmt, ext):
    data = _encode(rgb, fmt)
    with pytest.raises(Damaged) as e:
        decode_image(data[: len(data) // 2], ext, 32)
    assert e.value.reason == "truncated"


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (None, "no_image"),
    (NOT_IMAGE, "not_image"),
    (b"\x00" * 100, "not_image"),
])
def test_decode_damage_reasons(data, reason):
    with pytest.raises(Damaged) as e:
        decode_image(data, "jpg", 32)
    assert e.value.reason == reason and e.value.detail


def test_decode_unsupported_format():
    with pytest.raises(Damaged) as e:
        decode_image(PSD_HEADER, "png", 32)
    assert e.value.reason == "unsupported" and "PSD" in e.value.detail


@pytest.mark.parametrize("data", [bomb_png(), (DATA / "bomb.png").read_bytes()], ids=["made", "shared_copy"])
def test_bomb_refused_before_decoding(data):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(Damaged) as e:
        decode_image(data, "png", 32)
    assert e.value.reason == "bomb" and "50000x50000" in e.value.detail
    assert time.perf_counter() - t0 < 0.5
    # 2.5 G pixels would need >= 2.5 GB: max RSS must not grow by more than a few MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 50_000  # KiB


def test_pil_globals_guarded(rgb):
    from PIL import ImageFile

    assert Image.MAX_IMAGE_PIXELS  # PIL's own guard is left in force for other code (not set to None)
    data = _encode(rgb, "JPEG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # someone else flips the switch: we still never pad
    try:
        with pytest.raises(Damaged, match="truncated"):
            decode_image(data[: len(data) // 2], "jpg", 32)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_bomb_limit_is_configurable(rgb):
    with pytest.raises(Damaged) as e:
        decode_image(_encode(rgb, "PNG"), "png", 32, max_pixels=40 * 40 - 1)
    assert e.value.reason == "bomb"


def test_pick_image_and_batch(rgb):
    png = _encode(rgb, "PNG")
    assert pick_image({"__key__": "k", "json": b"{}"}) is None
    assert pick_image({"PNG": png, "json": b"{}"}) == ("png", png)
    imgs, ok, bad = decode_batch([("png", png), None, ("jpg", b""), ("png", png)], 16)
    assert imgs.shape == (2, 16, 16, 3) and ok == [0, 3]
    assert [(i, d.reason) for i, d in bad] == [(1, "no_image"), (2, "empty")]


def test_damaged_pickles():
    import pickle

    d = pickle.loads(pickle.dumps(Damaged("bomb", "big")))
    assert (d.reason, d.detail) == ("bomb", "big")


def test_iter_samples_groups_and_truncated_tar(pool_shards, tmp_path):
    path = pool_shards["paths"][0]
    samples = list(iter_samples(path))
    assert len(samples) == 40
    assert all(s["__url__"] == path and isinstance(s["json"], bytes) for s in samples)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2 + 100])
    errors: list = []
    partial = list(iter_samples(cut, errors=errors))
    assert 0 < len(partial) < 40 and errors and errors[0]["samples_read"] == len(partial)
    with pytest.raises(ShardReadError):
        for _ in iter_samples(cut):
            pass


def test_iter_samples_long_names_and_links(tmp_path):
    import tarfile

    path = tmp_path / "pax.tar"
    long_dir = "d/" + "x" * 150
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [(f"{long_dir}/000000001.jpg", b"abc"), (f"{long_dir}/000000001.json", b"{}"),
                           ("ünï/000000002.png", b"p" * 1000), (".hidden", b"h")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ünï/000000002.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    got = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(path)]
    assert got == [{"__key__": f"{long_dir}/000000001", "jpg": b"abc", "json": b"{}"},
                   {"__key__": "ünï/000000002", "png": b"p" * 1000}]


def test_verify_counts(pool_shards):
    report = verify_shards([pool_shards["folder"]])
    total = report["total"]
    assert total["samples"] == pool_shards["n"] and total["intact"] == pool_shards["intact"]
    assert total["damaged"] == pool_shards["damaged"]
    assert set(total["damaged"]) == {"truncated", "empty", "not_image", "bomb", "no_image"}
    got = {e["key"]: e["reason"] for s in report["shards"] for e in s["damaged_entries"]}
    want = {k: r for r, keys in pool_shards["keys_by_reason"].items() for k in keys}
    assert got == want
    assert total["ok"] and all(s["sidecar"]["agrees"] for s in report["shards"])


def test_verify_cli_json_and_tar_error(pool_shards, tmp_path, capsys):
    from odsd_dist import cli

    bad = tmp_path / "00009.tar"
    bad.write_bytes(Path(pool_shards["paths"][1]).read_bytes()[:3000])
    assert cli.main(["shards", "verify", pool_shards["paths"][0], str(bad), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["tar_errors"] == 1 and not report["total"]["ok"]
    assert report["shards"][1]["sidecar"]["present"] is False
    assert cli.main(["shards", "verify", str(tmp_path / "nope.tar")]) == 2
    assert "nope.tar" in capsys.readouterr().err


def test_verify_missing_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="missing-folder"):
        verify_shards([str(tmp_path / "missing-folder")])


def test_build_from_arrays_roundtrip_grey(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 1, 0, 2, 2], dtype=np.int64)
    images = np.stack([shape_image(int(c), 28, rng, 1)[:, :, 0] for c in labels])
    s = build_from_arrays(images, labels, tmp_path / "out", class_names=["a", "b", "c"], shard_size=3,
                          progress=False)
    assert s["samples"] == 7 and len(s["shards"]) == 3
    report = verify_shards([str(tmp_path / "out")])
    assert report["total"]["intact"] == 7 and report["total"]["members"] == {"cls": 7, "json": 7, "png": 7}
    x, y, names = load_labelled(str(tmp_path / "out"), 28, channels=1, progress=False)
    assert names == ["a", "b", "c"] and (y == labels).all() and (x[..., 0] == images).all()
    # deterministic bytes: a second build is identical
    s2 = build_from_arrays(images, labels, tmp_path / "out2", class_names=["a", "b", "c"], shard_size=3,
                           progress=False)
    for a, b in zip(s["shards"], s2["shards"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(UserError, match="already holds shards"):
        build_from_arrays(images, labels, tmp_path / "out", progress=False)


def test_tar_writer_fixed_headers_atomic_and_abort(tmp_path):
    import tarfile

    sample = {"__key__": "k1", "__url__": "x", "txt": b"hello", "cls": b"3"}
    with TarWriter(tmp_path / "a.tar") as tar:
        tar.add_sample(sample)
        assert not (tmp_path / "a.tar").exists()  # written under a temporary name until closed
    with TarWriter(tmp_path / "b.tar") as tar:
        tar.add_sample(dict(reversed(list(sample.items()))))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["k1.cls", "k1.txt"]  # suffix order, `__` fields left out
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(MTIME, 0o644, 0, 0, "", "")}
    with pytest.raises(RuntimeError), TarWriter(tmp_path / "c.tar") as tar:
        tar.add("k.txt", b"x")
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # aborted: nothing left behind
    w = ShardWriter(tmp_path / "rolled", None, shard_size=2)  # no sidecar
    for i in range(3):
        w.add_sample({"__key__": f"{i:09d}", "txt": b"%d" % i})
    assert [Path(p).name for p in w.close()] == ["00000.tar", "00001.tar"] and w.samples == 3


def test_build_from_folder_labelled_and_flat(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    for c, name in enumerate(["cat", "dog"]):
        (src / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(shape_image(c, 32, rng)).save(src / name / f"{i}.png")
    (src / "dog" / "broken.jpg").write_bytes(b"")  # skipped, counted
    s = build_from_folder(src, tmp_path / "lab", shard_size=4, fmt="png", progress=False)
    assert s["samples"] == 6 and s["class_names"] == ["cat", "dog"] and s["skipped"] == {"empty": 1}
    x, y, names = load_labelled(s["shards"], 32, progress=False)
    assert names == ["cat", "dog"] and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1] and x.shape == (6, 32, 32, 3)
    flat = src / "cat"
    s = build_from_folder(flat, tmp_path / "pool", fmt="keep", progress=False)
    assert not s["labelled"] and s["samples"] == 3
    assert verify_shards([str(tmp_path / "pool")])["total"]["intact"] == 3


def test_build_cli_npz(tmp_path, capsys):
    from odsd_dist.cli import main

    rng = np.random.default_rng(5)
    images = np.stack([shape_image(i % 2, 16, rng) for i in range(4)])
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 0, 1]), class_names=np.array(["x", "y"]))
    out = tmp_path / "o"
    assert main(["shards", "build", "--npz", str(tmp_path / "d.npz"), "--out", str(out), "--no-progress",
                 "--format", "jpg", "--shard-size", "3"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    assert json.loads((out / "classes.json").read_text()) == ["x", "y"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar",
                                                     "classes.json"]
    assert main(["shards", "build", "--npz", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o2")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    np.savez(tmp_path / "obj.npz", images=np.array([object()], dtype=object))  # pickled: refused, not loaded
    assert main(["shards", "build", "--npz", str(tmp_path / "obj.npz"), "--out", str(tmp_path / "o3")]) == 2


def test_labelled_fixtures_and_streaming(labelled_shards, labelled_grey_shards):
    x, y, names = load_labelled(labelled_shards["paths"], 32, progress=False)
    assert x.shape == (60, 32, 32, 3) and (y == labelled_shards["labels"]).all()
    assert names == labelled_shards["class_names"]
    batches = list(iter_labelled_batches(labelled_grey_shards["folder"], 28, channels=1, batch_size=7))
    assert [len(b[1]) for b in batches] == [7, 7, 7, 7, 2]
    assert (np.concatenate([b[0] for b in batches]) == labelled_grey_shards["images"]).all()


def test_labelled_skips_damaged_and_unlabelled(pool_shards):
    stats: dict = {}
    x, y, names = load_labelled(pool_shards["paths"], 32, progress=False, stats=stats)
    assert len(y) == 0 and stats["skipped"] == {"no_label": pool_shards["n"]}


def test_pool_fixture_variety(tmp_path):
    info = make_pool_shards(tmp_path, n_shards=1, per_shard=30, unsupported=True, seed=7)
    assert info["damaged"]["unsupported"] == 1 and info["intact"] == 30 - 8
    assert set(info["formats"]) == {"jpg", "png", "webp"}


def test_demo_pool_matches_provenance():
    """The committed demo pool: verify finds exactly the damaged keys its provenance lists."""
    import pyarrow.parquet as pq

    demo = Path(__file__).resolve().parents[1] / "shards" / "demo"
    if not (demo / "openworld_provenance.parquet").is_file():
        pytest.skip("shards/demo not present")
    report = verify_shards([str(demo / "openworld")])
    got = {e["key"]: e["reason"] for s in report["shards"] for e in s["damaged_entries"]}
    prov = pq.read_table(demo / "openworld_provenance.parquet", columns=["key", "damage"]).to_pydict()
    assert got == {k: d for k, d in zip(prov["key"], prov["damage"]) if d}
    assert report["total"]["samples"] == len(prov["key"]) and report["total"]["ok"]
