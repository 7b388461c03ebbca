"""The sample stage: quotas, streaming top-k, low-noise targets, every method on a real local Ray,
hand-over to a class with no candidates, bad inputs (exit 2 before Ray), byte-identical reruns."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synth import make_score_tables
from odsd_dist.cli import main
from odsd_dist.config import build_config
from odsd_dist.sample.keyhash import key_uniform
from odsd_dist.sample.quota import class_quotas
from odsd_dist.sample.targets import low_noise_targets
from odsd_dist.sample.topk import CLS, RANK, TopKMerger, per_class_topq
from odsd_dist.tables import SELECTION_SCHEMA, read_meta, score_schema, write_table

ROWS, N, C = 6000, 1200, 10


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """6k synthetic rows in 3 shards; class 2 never predicted, class 3 rare (hand-over)."""
    folder = tmp_path_factory.mktemp("scores") / "score"
    w = [1.0] * C
    w[3] = 0.0
    make_score_tables(folder, rows=ROWS, num_classes=C, feature_dim=16, shards=3, seed=3, class_weights=w,
                      drop_pred=[2])
    return folder


def _yaml(tmp_path, doc) -> str:
    import yaml

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def _cfg(tmp_path, scores, method, **sample):
    return build_config({"out": str(tmp_path), "seed": 5,
                         "sample": {"method": method, "n": N, "scores": str(scores), "batch_rows": 1024, **sample}})


# ------------------------------------------------------------------------------- pure parts


def test_quota_even_and_remainder():
    q = class_quotas(10, [100, 100, 100])
    assert q.tolist() == [4, 3, 3]


def test_quota_hands_over_in_proportion_to_remaining_candidates():
    q = class_quotas(100, [0, 5, 100, 300])  # quota 25 each; 25 + 20 missing go to classes 2 and 3 as 75:275
    assert q.sum() == 100 and q[0] == 0 and q[1] == 5
    assert q.tolist() == [0, 5, 25 + 10, 25 + 35]  # 45 handed over: 45*75/350=9.6 -> 10, 45*275/350=35.4 -> 35
    assert (q <= [0, 5, 100, 300]).all()
    assert class_quotas(1000, [3, 4, 5]).tolist() == [3, 4, 5]  # N above the pool: take everything


def test_topk_merge_is_exact_and_order_independent():
    rng = np.random.default_rng(0)
    n = 5000
    keys = np.array([f"k{i:05d}" for i in rng.permutation(n)])
    rank = np.round(rng.random(n), 2)  # many ties: the key decides
    cls = rng.integers(0, 3, n)
    t = pa.table({"key": keys, CLS: cls.astype(np.int32), RANK: rank})
    quotas = np.array([50, 0, 700])
    want = t.sort_by([(CLS, "ascending"), (RANK, "descending"), ("key", "ascending")])
    want = pa.concat_tables([want.filter(pa.compute.equal(want[CLS], k)).slice(0, int(quotas[k])) for k in range(3)])
    for order in (np.arange(n), rng.permutation(n)):
        m = TopKMerger(quotas, slack=0.1, min_buffer=100)
        tt = t.take(pa.array(order))
        for s in range(0, n, 333):
            m.add(per_class_topq(tt.slice(s, 333), quotas))
        got = m.result()
        assert got.column("key").to_pylist() == want.column("key").to_pylist()
        assert m.peak_rows < n


def test_low_noise_target_is_renormalised_tempered_softmax():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 10)).astype(np.float32) * 3
    order = np.argsort(-z, axis=1)
    idx, p = low_noise_targets(order.astype(np.int32), np.take_along_axis(z, order, 1), k=3, tau=4.0)
    full = np.exp(z / 4.0) / np.exp(z / 4.0).sum(1, keepdims=True)
    kept = np.take_along_axis(full, order[:, :3], 1)
    np.testing.assert_allclose(p, kept / kept.sum(1, keepdims=True), rtol=1e-5)
    assert (idx == order[:, :3]).all() and np.allclose(p.sum(1), 1)


def test_score_tables_keep_floats_out_of_dictionaries(scores):
    """tables.parquet_options: float columns are byte-stream-split, never dictionary-encoded (a dictionary
    attempt on the float16 features made reading them ~3x slower), and they read back as declared."""
    f = sorted((scores / "scores").glob("*.parquet"))[0]
    rg = pq.ParquetFile(f).metadata.row_group(0)
    enc = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
    for col in ("feature.list.element", "maxprob", "energy", "topk_logit.list.element"):
        assert "BYTE_STREAM_SPLIT" in enc[col] and "RLE_DICTIONARY" not in enc[col], (col, enc[col])
    assert "RLE_DICTIONARY" in enc["shard"]
    t = pq.read_table(f)
    assert t.schema.field("feature").type == pa.list_(pa.float16(), 16) and t.num_rows > 0


def test_key_uniform_is_seeded_and_spread():
    keys = pa.array([f"{i:09d}" for i in range(20000)] + [""])
    u = key_uniform(keys, 1)
    assert np.array_equal(u, key_uniform(keys, 1)) and not np.array_equal(u, key_uniform(keys, 2))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert np.array_equal(key_uniform(keys.slice(5, 10), 1), u[5:15])


# ------------------------------------------------------------------------------- on Ray


def _check_selection(path, method, n_expected):
    t = pq.read_table(path)
    assert [(f.name, f.type) for f in t.schema] == [(f.name, f.type) for f in SELECTION_SCHEMA]
    assert t.num_rows == n_expected
    assert len(set(t.column("key").to_pylist())) == t.num_rows
    probs = np.array(t.column("target_prob").to_pylist())
    assert probs.shape[1] == 3 and np.allclose(probs.sum(1), 1, atol=1e-5)
    meta = read_meta(path)
    assert meta["method"] == method and meta["teacher_sha256"] == "synthetic-3"
    assert meta["config"]["seed"] == 5 and meta["targets"] == {"topk": 3, "tau": 4.0}
    pred = t.column("pred").to_numpy()
    keys = t.column("key").to_pylist()
    if method != "all":
        assert all((pred[i], keys[i]) <= (pred[i + 1], keys[i + 1]) for i in range(len(keys) - 1))
    return t, meta


@pytest.mark.parametrize("method", ["aps", "maxprob", "balanced-random", "random", "entropy-high", "all"])
def test_method(ray_local, tmp_path, scores, method, capsys):
    s = main(["sample", "--config", _yaml(tmp_path, {"out": str(tmp_path), "seed": 5, "sample": {
        "method": method, "n": N, "scores": str(scores), "batch_rows": 1024}})])
    assert s == 0
    out = capsys.readouterr().out
    assert f"method={method}" in out and "rows scanned" in out
    done = json.loads((tmp_path / "sample" / "done.json").read_text())["summary"]
    expected = done["pool_rows"] if method == "all" else N
    t, meta = _check_selection(tmp_path / "sample" / "selection.parquet", method, expected)
    per_class = np.bincount(t.column("pred").to_numpy(), minlength=C)
    assert per_class[2] == 0  # the teacher never predicts class 2
    if method in ("aps", "maxprob", "balanced-random"):
        cand = np.array(meta["candidates"])
        assert cand[2] == 0 and 0 < cand[3] < N // C  # class 3 is short: hand-over
        assert per_class[3] == cand[3]
        assert per_class.tolist() == meta["quotas"]
        assert (per_class[[0, 1, 4, 5, 6, 7, 8, 9]] > N // C).all()  # others absorbed the rest
    if method == "maxprob":  # the top maxprob per class: nothing rejected beats a selected row
        pool = pa.concat_tables([pq.read_table(f, columns=["key", "pred", "maxprob"]) for f in sorted((scores / "scores").glob("*.parquet"))])
        sel = set(t.column("key").to_pylist())
        mask = np.array([k in sel for k in pool.column("key").to_pylist()])
        mp, pr = pool.column("maxprob").to_numpy(), pool.column("pred").to_numpy()
        for k in (0, 5):
            assert mp[mask & (pr == k)].min() >= mp[~mask & (pr == k)].max()
    if method == "entropy-high":
        assert t.column("score").to_numpy().min() > 0.3


def test_a_registered_baseline_is_a_sampling_method(ray_local, tmp_path, scores):
    """One `register(...)` makes a new baseline a `sample.method` (here: the least confident N/C per class)."""
    from odsd_dist.sample import baselines, run_sample
    from odsd_dist.sample.columns import col_np

    baselines.register("minprob", baselines.Ranker(True, (), lambda b, seed: -col_np(b, "maxprob", np.float64)))
    try:
        s = run_sample(_cfg(tmp_path, scores, "minprob"))
    finally:
        del baselines.RANKERS["minprob"]
    t, _ = _check_selection(tmp_path / "sample" / "selection.parquet", "minprob", N)
    assert s["selected"] == N
    pool = pa.concat_tables([pq.read_table(f, columns=["key", "pred", "maxprob"]) for f in sorted((scores / "scores").glob("*.parquet"))])
    sel = set(t.column("key").to_pylist())
    mask = np.array([k in sel for k in pool.column("key").to_pylist()])
    mp, pr = pool.column("maxprob").to_numpy(), pool.column("pred").to_numpy()
    for k in (0, 5):  # nothing rejected is less confident than a selected row of its class
        assert mp[mask & (pr == k)].max() <= mp[~mask & (pr == k)].min()


def test_aps_knobs_and_kmeans(ray_local, tmp_path, scores):
    from odsd_dist.sample import run_sample

    cfg = _cfg(tmp_path, scores, "aps", aps={"rounds": 2, "prototypes_per_class": 3, "prototype_source": "confident",
                                            "weight_by_score": True, "a_e": 0.5})
    s = run_sample(cfg)
    # k > 1 modes per class: the rounds run on the stats pass's sample; one select pass whatever the rounds
    assert s["selected"] == N and [p["pass"] for p in s["passes"]] == ["stats", "select"]
    t = pq.read_table(tmp_path / "sample" / "selection.parquet")
    w = t.column("weight").to_numpy()
    assert abs(w.mean() - 1) < 1e-3 and w.std() > 0


def test_aps_cosine_sample_is_fixed_by_content(ray_local, tmp_path, scores):
    """With a pool larger than aps.stats_sample_rows, z(r) is standardised on a sample picked by feature
    hash: other block boundaries give the byte-identical selection, and it stays close to the exact one."""
    from odsd_dist.sample import run_sample

    def sel(out, **kw):
        run_sample(_cfg(out, scores, "aps", **kw))
        return out / "sample" / "selection.parquet"

    small = {"aps": {"stats_sample_rows": 1000}}
    a = sel(tmp_path / "a", **small)
    b = sel(tmp_path / "b", batch_rows=1500, **small)
    exact = sel(tmp_path / "exact")  # the default sample (200k rows) holds all 6k rows
    assert pq.read_table(a).equals(pq.read_table(b))  # the rows (the metadata holds each run's batch_rows)
    ka, ke = (set(pq.read_table(p, columns=["key"]).column("key").to_pylist()) for p in (a, exact))
    assert len(ka) == len(ke) == N and len(ka & ke) >= 0.95 * N


def test_aps_floor_too_high_reruns_the_select_pass(ray_local, tmp_path, scores, monkeypatch):
    """Floors above a class's quota-th best score would lose rows: the pass reruns without floors."""
    from odsd_dist.sample import aps, run_sample

    ref = tmp_path / "ref"
    run_sample(_cfg(ref, scores, "aps"))
    monkeypatch.setattr(aps, "select_floors", lambda order, score, share, quotas, counts: np.full(len(quotas), np.inf, np.float32))
    s = run_sample(_cfg(tmp_path / "high", scores, "aps"))
    assert [p["pass"] for p in s["passes"]] == ["stats", "select", "select_again"]
    a, b = (pq.read_table(p / "sample" / "selection.parquet") for p in (ref, tmp_path / "high"))
    assert a.equals(b)
    meta = read_meta(tmp_path / "high" / "sample" / "selection.parquet")
    assert meta["aps"]["floors_too_high"] == [k for k, q in enumerate(meta["quotas"]) if q > 0]


def test_same_inputs_and_seed_give_byte_identical_selection(ray_local, tmp_path, scores, capsys):
    from odsd_dist.sample import run_sample

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_sample(_cfg(out, scores, "aps"))
    assert (a / "sample" / "selection.parquet").read_bytes() == (b / "sample" / "selection.parquet").read_bytes()
    capsys.readouterr()
    run_sample(_cfg(a, scores, "aps"))  # same config and inputs: skipped via done.json
    assert "up to date" in capsys.readouterr().out
    # another seed changes a seeded baseline's choice
    r1 = run_sample(_cfg(tmp_path / "r1", scores, "random"))
    cfg = _cfg(tmp_path / "r2", scores, "random")
    cfg.seed = 6
    r2 = run_sample(cfg)
    k1 = pq.read_table(r1["selection"]).column("key").to_pylist()
    k2 = pq.read_table(r2["selection"]).column("key").to_pylist()
    assert k1 != k2


def test_refine_rows_only_where_the_sample_share_is_short():
    from odsd_dist.sample.aps import refine_rows

    take = np.array([0, 5, 40, 0, 2])
    need = refine_rows(take, quotas=np.array([3, 100, 100, 0, 100]), counts=np.array([30, 10**6, 10**6, 0, 1]), min_rows=32)
    assert need.tolist() == [3, 32, 0, 0, 0]  # capped by quota; enough in the sample; empty class; all of a 1-row class taken
    assert refine_rows(take, np.full(5, 100), np.full(5, 10**6), 0).tolist() == [0] * 5  # 0 turns it off


@pytest.fixture(scope="module")
def scores_c1000(tmp_path_factory):
    """C = 1,000 classes, 30 rows each on average: with a 1,000-row stats sample each class has ~1 sample row
    and a share of its quota (3) of ~0.1 rows, as with ImageNet's C over a 10^9-row pool."""
    folder = tmp_path_factory.mktemp("scores1000") / "score"
    make_score_tables(folder, rows=30_000, num_classes=1000, feature_dim=16, shards=2, seed=11, topk=3)
    return folder


def test_aps_c1000_second_round_moves_the_prototypes(ray_local, tmp_path, scores_c1000):
    from odsd_dist.sample import run_sample

    def run(out, batch_rows=8192, **aps):
        cfg = build_config({"out": str(out), "seed": 5, "sample": {
            "method": "aps", "n": 3000, "scores": str(scores_c1000), "batch_rows": batch_rows,
            "aps": {"stats_sample_rows": 1000, **aps}}})
        return run_sample(cfg), pq.read_table(out / "sample" / "selection.parquet")

    s, sel = run(tmp_path / "a")
    r1 = s["rounds"][0]
    q = np.array(s["quotas"])
    counts = np.array(s["candidates"])
    assert [p["pass"] for p in s["passes"]] == ["stats", "refine1", "select"]
    # every class took min(quota, count, 32) rows for its round-2 prototypes, and every one of them moved
    assert r1["rows_per_class"] == np.minimum(q, counts).tolist()
    assert r1["refined_classes"] == int((np.minimum(q, counts) > 0).sum()) > 900
    assert r1["prototypes_moved"] == r1["refined_classes"]
    # the old behaviour (sample rows only): nearly every class keeps its round-1 prototype
    s0, sel0 = run(tmp_path / "off", min_rows_per_class=0)
    assert s0["rounds"][0]["prototypes_moved"] < 50 and [p["pass"] for p in s0["passes"]] == ["stats", "select"]
    assert not sel.equals(sel0)
    # the refine pass is exact and block-independent: other block cuts give the same rows
    _, sel_b = run(tmp_path / "b", batch_rows=3000)
    assert sel.equals(sel_b)
    meta = read_meta(tmp_path / "a" / "sample" / "selection.parquet")
    assert meta["aps"]["rounds"][0]["rows_per_class"] == r1["rows_per_class"]


# ------------------------------------------------------------------------------- bad inputs: exit 2


@pytest.fixture
def no_ray(monkeypatch):
    """Bad inputs must fail before any Ray work: starting Ray is itself a test failure here."""
    import odsd_dist.raytools

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the input was validated")

    monkeypatch.setattr(odsd_dist.raytools, "init_ray", refuse)


def _run_cli(tmp_path, scores_dir, capsys):
    rc = main(["sample", "--config", _yaml(tmp_path, {"out": str(tmp_path), "sample": {"scores": str(scores_dir)}})])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("odsd: error: ")  # one line, no traceback
    return rc, err


def test_missing_score_dir(tmp_path, capsys, no_ray):
    rc, err = _run_cli(tmp_path, tmp_path / "nowhere", capsys)
    assert rc == 2 and "nowhere" in err and "score dir not found" in err


def test_empty_score_table(tmp_path, capsys, no_ray):
    d = tmp_path / "score"
    meta = {"num_classes": C, "feature_dim": 8, "class_names": [str(i) for i in range(C)], "teacher_sha256": "x"}
    write_table(score_schema(8).empty_table(), d / "scores" / "00000.parquet", meta)
    (d / "done.json").write_text("{}")
    rc, err = _run_cli(tmp_path, d, capsys)
    assert rc == 2 and "hold no rows" in err and str(d) in err
    (d / "scores" / "00000.parquet").unlink()
    rc, err = _run_cli(tmp_path, d, capsys)
    assert rc == 2 and "no score tables" in err


def test_malformed_score_table(tmp_path, capsys, no_ray):
    d = tmp_path / "score"
    bad = pa.table({"key": ["a"], "pred": pa.array([0], pa.int64())})
    write_table(bad, d / "scores" / "00000.parquet", {"num_classes": C, "feature_dim": 8})
    (d / "done.json").write_text("{}")
    rc, err = _run_cli(tmp_path, d, capsys)
    assert rc == 2 and "wrong schema" in err and "00000.parquet" in err
    (d / "scores" / "00000.parquet").write_bytes(b"not parquet at all")
    rc, err = _run_cli(tmp_path, d, capsys)
    assert rc == 2 and "not a readable Parquet file" in err
    (d / "done.json").unlink()
    rc, err = _run_cli(tmp_path, d, capsys)
    assert rc == 2 and "did not finish" in err


def test_reshard_writes_selected_images(ray_local, tmp_path, pool_shards):
    import tarfile

    from odsd_dist.sample import run_sample
    from odsd_dist.tables import read_meta

    keys = sorted(pool_shards["intact_keys"])
    src = tmp_path / "synthetic"
    make_score_tables(src, rows=len(keys), num_classes=3, feature_dim=8, shards=1, seed=1, provenance=False)
    f = src / "scores" / "00000.parquet"
    t = pq.read_table(f)
    t = t.set_column(0, "key", pa.array(keys)).set_column(1, "shard", pa.array([k[:5] for k in keys]))
    score = tmp_path / "score"
    write_table(t, score / "scores" / "pool.parquet", read_meta(f))
    (score / "done.json").write_text("{}")
    cfg = build_config({"out": str(tmp_path), "sample": {"method": "maxprob", "n": 10, "scores": str(score),
                                                          "reshard": str(tmp_path / "reshard"),
                                                          "pool_shards": [pool_shards["folder"]]}})
    s = run_sample(cfg)
    assert s["reshard"]["written"] == 10 and s["reshard"]["missing"] == 0
    sel = pq.read_table(s["selection"])
    got = set()
    for tar in sorted((tmp_path / "reshard").glob("*.tar")):
        with tarfile.open(tar) as tf:
            got |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
        side = pq.read_table(tar.with_suffix(".parquet"))
        assert set(side.column("key").to_pylist()) <= set(sel.column("key").to_pylist())
    assert got == set(sel.column("key").to_pylist())
