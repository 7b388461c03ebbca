"""The model zoo contract (logits, penultimate features, classify) and safetensors I/O with metadata."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from odsd_dist.errors import UserError
from odsd_dist.models import (ARCHS, build_model, load_model, normalize, read_model_meta, save_model,
                              weights_sha256)

CIFAR_ARCHS = ["resnet8", "resnet20", "resnet32", "resnet56", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2",
               "resnet18_cifar", "resnet34_cifar", "mobilenetv2"]
SIZE = {"resnet18": 224, "resnet34": 64, "resnet50": 64}
BIG = {"resnet18_cifar", "resnet34_cifar", "mobilenetv2", "resnet18", "resnet34", "resnet50"}  # batch 1: CPU time


def test_registry_lists_every_arch():
    assert set(ARCHS) == set(CIFAR_ARCHS) | {"resnet18", "resnet34", "resnet50"}


def _check(arch: str, in_chans: int, size: int, n: int = 2) -> None:
    torch.manual_seed(0)
    m = build_model(arch, num_classes=7, in_chans=in_chans).eval()
    assert m.arch == arch and m.num_classes == 7 and m.in_chans == in_chans
    x = torch.randn(n, in_chans, size, size)
    with torch.no_grad():
        f = m.forward_features(x)
        z = m(x)
    assert f.shape == (n, m.feature_dim)
    assert z.shape == (n, 7)
    torch.testing.assert_close(m.classify(f), z)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_features_rgb(arch):
    _check(arch, 3, SIZE.get(arch, 32), n=1 if arch in BIG else 2)


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_cifar_models_take_28px_grey(arch):
    _check(arch, 1, 28, n=1 if arch in BIG else 2)


def test_feature_dims():
    expect = {"resnet20": 64, "wrn16_2": 128, "wrn40_2": 128, "resnet18_cifar": 512, "mobilenetv2": 1280,
              "resnet50": 2048}
    for arch, d in expect.items():
        assert build_model(arch, 10).feature_dim == d


def test_unknown_arch_and_missing_timm():
    with pytest.raises(UserError, match="unknown model arch 'resnet9000'"):
        build_model("resnet9000", 10)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs timm"):
            build_model("timm:resnet18", 10)


def _trained_like(arch: str = "resnet8", in_chans: int = 3):
    """A model whose BN running statistics are not the defaults, so buffers must round-trip too."""
    torch.manual_seed(1)
    m = build_model(arch, 4, in_chans)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, in_chans, 32, 32) * 3 + 1)
    return m.eval()


META = {"input_size": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26],
        "class_names": ["cat", "dog", "ship", "frog"], "val_acc": 0.875, "teacher_train": {"epochs": 3}}


def test_save_load_round_trip(tmp_path):
    m = _trained_like()
    path = tmp_path / "w" / "model.safetensors"
    save_model(m, path, META)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    m2, meta = load_model(path)
    assert not m2.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        assert torch.equal(m.forward_features(x), m2.forward_features(x))
    for k, v in META.items():
        assert meta[k] == v
    assert (meta["arch"], meta["num_classes"], meta["in_chans"], meta["feature_dim"]) == ("resnet8", 4, 3, 64)
    assert read_model_meta(path) == meta
    assert len(weights_sha256(path)) == 64


def test_grey_model_round_trip(tmp_path):
    m = _trained_like("wrn16_1", in_chans=1)
    save_model(m, tmp_path / "g.safetensors", {"input_size": 28, "mean": [0.13], "std": [0.31], "class_names": list("abcd")})
    m2, meta = load_model(tmp_path / "g.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert meta["in_chans"] == 1


def test_bad_files_are_user_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="nope.safetensors"):
        load_model(missing)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="garbled.safetensors"):
        load_model(garbled)
    good = tmp_path / "good.safetensors"
    save_model(_trained_like(), good, META)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_model(truncated)


def test_unknown_or_mismatched_arch_in_metadata(tmp_path):
    from safetensors.torch import save_file

    m = _trained_like()
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    unknown = tmp_path / "unknown.safetensors"
    save_file(state, str(unknown), metadata={"arch": '"nonet"', "num_classes": "4", "in_chans": "3"})
    with pytest.raises(UserError, match="unknown.safetensors.*unknown model arch"):
        load_model(unknown)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"arch": '"resnet20"', "num_classes": "4", "in_chans": "3"})
    with pytest.raises(UserError, match="wrong.safetensors.*do not match"):
        load_model(wrong)
    nometa = tmp_path / "nometa.safetensors"
    save_file(state, str(nometa))
    with pytest.raises(UserError, match="nometa.safetensors.*lacks"):
        load_model(nometa)


def test_normalize_uint8_nhwc():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    meta = {"in_chans": 3, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.2]}
    want = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    got = normalize(x, meta)
    assert got.shape == (4, 3, 5, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(normalize(torch.from_numpy(x), meta), want)  # torch input
    torch.testing.assert_close(normalize(x[0], meta), want[:1])  # one HWC image
    torch.testing.assert_close(normalize(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, meta), want)


def test_normalize_adapts_channels():
    grey = np.full((2, 4, 4, 1), 128, np.uint8)
    rgb_meta = {"in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    out = normalize(grey, rgb_meta)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, torch.full_like(out, (128 / 255 - 0.5) / 0.5))
    rgb = np.full((1, 4, 4, 3), 200, np.uint8)
    out = normalize(rgb, {"in_chans": 1, "mean": [0.0], "std": [1.0]})
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 255), atol=1e-5, rtol=1e-5)


def test_same_weights_same_bytes(tmp_path):
    """The weights sha256 is the teacher identity in every table: saving twice must give the same file."""
    m = _trained_like()
    save_model(m, tmp_path / "a.safetensors", META)
    save_model(m, tmp_path / "b.safetensors", dict(reversed(list(META.items()))))
    assert weights_sha256(tmp_path / "a.safetensors") == weights_sha256(tmp_path / "b.safetensors")


@pytest.mark.parametrize("arch,threads", [("resnet8", 1), ("wrn16_1", 2), ("mobilenetv2", 1)])
def test_frozen_forward_matches_eager_and_ignores_batch_position(arch, threads):
    """score.inference=jit: same scores as the eager module to float32 rounding, and a row's result is
    bit-identical wherever Ray Data puts it (position in the batch, batch size), so a resumed scoring run
    writes the same table as an uninterrupted one."""
    from odsd_dist.models import inference_forward

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = _trained_like(arch)
        x = torch.randn(96, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            fwd, mode = inference_forward(m, x[:32], "jit")
            assert mode == "jit"
            z, f = fwd(x)
            torch.testing.assert_close(z, m(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(f, m.forward_features(x), rtol=1e-4, atol=1e-4)
            for size, start in ((32, 0), (32, 40), (64, 17), (96, 0)):
                for shift in (0, 5, 31):
                    part = torch.roll(x[start:start + size], shift, 0)
                    zp, fp = fwd(part)
                    assert torch.equal(torch.roll(zp, -shift, 0), z[start:start + size]), (size, start, shift)
                    assert torch.equal(torch.roll(fp, -shift, 0), f[start:start + size]), (size, start, shift)
    finally:
        torch.set_num_threads(old)


def test_scorer_streams_equal_one_thread_bit_for_bit(tmp_path):
    """score.streams: the scoring actor splits a batch into single-threaded forwards side by side; every row
    comes out bit-identical to one single-threaded forward of the whole batch, whatever the batch size."""
    import numpy as np

    from fixtures import make_teacher
    from odsd_dist.score.scorer import TeacherScorer

    weights = make_teacher(tmp_path / "t.safetensors", arch="resnet8")
    old = torch.get_num_threads()
    try:
        one = TeacherScorer(weights, "cpu", "float32", topk=3, feature_dim=64, seed=0, threads=1)
        two = TeacherScorer(weights, "cpu", "float32", topk=3, feature_dim=64, seed=0, threads=2)
        assert (one.streams, two.streams, one.pool) == (1, 2, None)
        images = np.random.default_rng(0).integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)

        def batch(lo, hi):
            n = hi - lo
            return {"key": [f"k{i}" for i in range(lo, hi)], "shard": ["s"] * n, "url": [""] * n,
                    "reason": [""] * n, "detail": [""] * n, "image": images[lo:hi]}

        want = one(batch(0, 150))
        for lo, hi in ((0, 150), (0, 33), (20, 130), (149, 150)):
            got = two(batch(lo, hi))
            assert got.equals(want.slice(lo, hi - lo)), (lo, hi)
    finally:
        torch.set_num_threads(old)
