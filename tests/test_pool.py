"""What a crawled pool may contain (docs/POOL.md): every image format Pillow reads safely, keys that
are not plain names, duplicate keys across shards — through `odsd shards verify` and `odsd score`."""
from __future__ import annotations

import glob
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crawl_pool import DUP_KEY, cases, exif_rotated_jpeg, make_crawl_pool
from fixtures import make_teacher
from odsd_dist.config import load_config
from odsd_dist.shards import dupes as D
from odsd_dist.shards.decode import Damaged, decode_image, pick_image
from odsd_dist.shards.keys import key_problem, safe_repr
from odsd_dist.shards.tario import iter_samples
from odsd_dist.shards.verify import verify_shards


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return make_crawl_pool(tmp_path_factory.mktemp("crawl"))


@pytest.mark.parametrize("key,ext,data,reason", [c for c in cases() if c[3] != "bad_key"],
                         ids=[c[0] for c in cases() if c[3] != "bad_key"])
def test_decode_each_case(key, ext, data, reason):
    if reason:
        with pytest.raises(Damaged) as e:
            decode_image(data, ext, 32)
        assert e.value.reason == reason and e.value.detail
    else:
        out = decode_image(data, ext, 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_exif_orientation_and_16bit_range():
    up = decode_image(exif_rotated_jpeg(), "jpg", 32).astype(int)
    assert up[:8, :, 0].mean() > 200 and up[-8:, :, 2].mean() > 200  # red on top, blue below
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buf, format="PNG")
    assert abs(int(decode_image(buf.getvalue(), "png", 8, channels=1).mean()) - 40000 // 256) <= 1  # scaled, not clipped


def test_bomb_guard_every_format():
    for fmt in ("GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("L", (300, 200)).save(buf, format=fmt)
        with pytest.raises(Damaged) as e:
            decode_image(buf.getvalue(), "x", 32, max_pixels=300 * 200 - 1)
        assert e.value.reason == "bomb" and fmt in e.value.detail


def test_content_decides_member():
    png = cases()[1][2]  # BMP bytes
    assert pick_image({"__key__": "k", "json": b"{}", "dat": png}) == ("dat", png)
    assert pick_image({"__key__": "k", "json": b"{}", "txt": b"hello"}) is None


@pytest.mark.parametrize("key", ["", "a/b", "..", "../x", "a\\b", "a\nb", "a\x00b", "a\x7fb", "x" * 201, "a\udcffb"])
def test_bad_keys(key):
    assert key_problem(key) is not None
    assert all(0x20 <= ord(c) < 0x7F for c in safe_repr(key))


@pytest.mark.parametrize("key", ["000000001", "a.b", "img_001-x", "é", "x" * 200])
def test_good_keys(key):
    assert key_problem(key) is None


def test_duplicates_rule_and_partition_invariance():
    names = ["s0", "s1", "s2"]
    shard_keys = [[(0, "a"), (1, "b"), (2, "a")], [(0, "b"), (1, "c")], [(0, "a"), (1, "d"), (2, "c")]]
    want = [("s0", 2, "a"), ("s1", 0, "b"), ("s2", 0, "a"), ("s2", 2, "c")]
    for parts in (1, 2, 7):
        t = D.find_duplicates_local(shard_keys, names, parts)
        assert list(zip(*(t.column(c).to_pylist() for c in ("shard", "ordinal", "key")))) == want
        firsts = dict(zip(t.column("key").to_pylist(), zip(t.column("first_shard").to_pylist(),
                                                          t.column("first_ordinal").to_pylist())))
        assert firsts == {"a": ("s0", 0), "b": ("s0", 1), "c": ("s1", 1)}


def test_verify_crawl_pool(crawl):
    r = verify_shards(crawl["paths"])
    t = r["total"]
    assert dict(sorted(t["damaged"].items())) == crawl["reasons"]
    assert t["duplicate_keys"] == 3 and t["intact"] == len(crawl["scored"])
    entries = [(e["key"], e["reason"]) for s in r["shards"] for e in s["damaged_entries"] if e["reason"] != "bad_key"]
    assert sorted(entries) == crawl["quarantined"]
    bad = [e for s in r["shards"] for e in s["damaged_entries"] if e["reason"] == "bad_key"]
    assert any("../../000030956.jpg" in e["detail"] for e in bad)


def test_score_crawl_pool(crawl, tmp_path, ray_local):
    from prometheus_client import REGISTRY

    from odsd_dist.score import run_score

    teacher = make_teacher(tmp_path / "t.safetensors", arch="resnet8")
    cfg = load_config(None, [f"teacher.weights={teacher}", f"score.shards=[{crawl['folder']}]", f"out={tmp_path}"])
    s = run_score(cfg)
    assert s["reasons"] == crawl["reasons"] and s["duplicate_keys"] == 3
    assert s["rows"] == len(crawl["scored"])
    scores = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(tmp_path / "score/scores/*.parquet")))])
    quar = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(tmp_path / "score/quarantine/*.parquet")))])
    assert sorted(scores.column("key").to_pylist()) == crawl["scored"]
    assert scores.filter(pa.compute.equal(scores.column("key"), DUP_KEY)).column("shard").to_pylist() == ["00000"]
    rows = list(zip(quar.column("key").to_pylist(), quar.column("reason").to_pylist()))
    assert sorted(r for r in rows if r[1] != "bad_key") == crawl["quarantined"]
    bad = quar.filter(pa.compute.equal(quar.column("reason"), "bad_key")).to_pylist()
    assert len(bad) == 3
    assert any(b["detail"].endswith("members: ../../000030956.jpg, ../../000030956.json") for b in bad)
    assert all(0x20 <= ord(c) < 0x7F for b in bad for c in b["key"])
    assert REGISTRY.get_sample_value("odsd_score_duplicate_keys") == 3
    assert pq.read_table(Path(tmp_path) / "score" / "duplicates.parquet").num_rows == 3


def test_ray_duplicate_pass_equals_local(crawl, ray_local):
    from odsd_dist.pool.dupes import find_duplicates

    names = [Path(x).stem for x in crawl["paths"]]
    keys = [[(i, s["__key__"]) for i, s in enumerate(iter_samples(x)) if key_problem(s["__key__"]) is None]
            for x in crawl["paths"]]
    for n in (1, 4):  # one shard: one partition
        got = find_duplicates(names[:n], crawl["paths"][:n])
        assert got.equals(D.find_duplicates_local(keys[:n], names[:n], 3)), n
    assert find_duplicates(names, crawl["paths"]).num_rows == 3


@pytest.mark.parametrize("data,fmt", [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n" + bytes(40), "EPS"),  # would run Ghostscript: never opened
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(64), "CR2"),  # a TIFF by its magic, but a camera raw
    (b"\x00\x00\x00\x1cftypavif" + bytes(40), "AVIF"),
])
def test_recognised_formats_not_decoded(data, fmt):
    with pytest.raises(Damaged) as e:
        decode_image(data, "jpg", 32)
    assert e.value.reason == "unsupported" and fmt in e.value.detail
