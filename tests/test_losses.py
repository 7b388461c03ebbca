"""Each distillation loss term against values computed by hand on tiny fixed tensors (METHODS.md §1.3-1.4, §4)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from odsd_dist.distill.config import MethodOptions
from odsd_dist.distill.methods import Dims, build_method, known_methods
from odsd_dist.distill.methods.kd3 import mix_statistics
from odsd_dist.distill.methods.losses import (kd_loss, low_noise_targets, nt_xent, relation_loss, relation_weights,
                                              sparse_kd_loss)
from odsd_dist.errors import UserError

LN3 = math.log(3.0)


def test_kd_loss_hinton_t4():
    # softmax([4 ln3, 0] / 4) = [3/4, 1/4]; softmax([0, 0] / 4) = [1/2, 1/2]
    z_t = torch.tensor([[4 * LN3, 0.0]])
    z_s = torch.zeros(1, 2)
    want = 16 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert kd_loss(z_s, z_t, 4.0).item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(z_t, z_t, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_sparse_kd_loss_with_padding_and_weights():
    z_s = torch.zeros(2, 3)  # p = 1/3 everywhere
    z_s[1] = torch.tensor([0.0, 4 * LN3, 0.0])  # softmax(z/4) = [1/5, 3/5, 1/5]
    idx = torch.tensor([[0, 2, 1], [1, 0, 2]])
    prob = torch.tensor([[0.8, 0.2, 0.0], [0.5, 0.5, 0.0]])  # third entry is padding
    l0 = 16 * (0.8 * math.log(0.8 * 3) + 0.2 * math.log(0.2 * 3))
    l1 = 16 * (0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.2))
    assert sparse_kd_loss(z_s, idx, prob, 4.0).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    w = torch.tensor([1.0, 3.0])
    assert sparse_kd_loss(z_s, idx, prob, 4.0, w).item() == pytest.approx((l0 + 3 * l1) / 4, rel=1e-5)


def test_low_noise_targets_online():
    idx, prob = low_noise_targets(torch.tensor([[4 * LN3, 0.0, -10.0]]), k=2, tau=4.0)
    assert idx.tolist() == [[0, 1]]
    assert prob[0].tolist() == pytest.approx([0.75, 0.25], rel=1e-6)


def test_nt_xent_by_hand():
    e = torch.eye(2)
    # 4 views [e1, e2, e1, e2], temp 1: each row has its positive at cos 1 and two negatives at cos 0
    want = math.log(1 + 2 / math.e)
    assert nt_xent(e, e.clone(), 1.0).item() == pytest.approx(want, rel=1e-6)
    # scaling does not matter (features are L2-normalised)
    assert nt_xent(3 * e, 0.5 * e, 1.0).item() == pytest.approx(want, rel=1e-6)


def _softmax(v):
    m = max(v)
    ex = [math.exp(x - m) for x in v]
    s = sum(ex)
    return [x / s for x in ex]


def test_relation_loss_by_hand():
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    f_s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    a_t = [[0.0, r], [0.0, r], [r, r]]  # off-diagonal cosines, row by row
    a_s = [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    temp = 0.5
    rows = []
    for at, as_ in zip(a_t, a_s):
        q = _softmax([x / temp for x in at])
        p = _softmax([x / temp for x in as_])
        rows.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)))
    assert relation_loss(f_s, f_t, temp).item() == pytest.approx(sum(rows) / 3, rel=1e-5)
    w = torch.tensor([1.0, 0.0, 0.5])
    assert relation_loss(f_s, f_t, temp, w).item() == pytest.approx((rows[0] + 0.5 * rows[2]) / 1.5, rel=1e-5)


def test_relation_weights_denoise():
    z = torch.tensor([[0.0, LN3], [0.0, 0.0]])  # maxprob 3/4 and 1/2
    assert relation_weights(z, 0.5).tolist() == pytest.approx([1.0, 1.0])
    assert relation_weights(z, 0.8).tolist() == pytest.approx([0.75 / 0.8, 0.5 / 0.8])
    assert relation_weights(z, 0.0).tolist() == [1.0, 1.0]


class Tiny(nn.Module):
    """A linear 'network' with the zoo contract: features = W x (flattened), logits = V f."""

    def __init__(self, d_in: int, d_f: int, c: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.feat = nn.Linear(d_in, d_f, bias=False)
        self.fc = nn.Linear(d_f, c, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.randn(d_f, d_in, generator=g))
            self.fc.weight.copy_(torch.randn(c, d_f, generator=g))
        self.feature_dim = d_f

    def forward_features(self, x):
        return self.feat(x.flatten(1))

    def classify(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.classify(self.forward_features(x))


DIMS = Dims(5, 6, 3)


def _odsd(**kw):
    """The options section with odsd's options replaced."""
    return MethodOptions(odsd=type(MethodOptions().odsd)(**kw))


def _batch(b=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(b, 1, 2, 2, generator=g)  # noqa: E731
    return {"weak": x(), "view0": x(), "view1": x(), "weight": torch.ones(b),
            "tgt_idx": torch.tensor([[0, 1]] * b), "tgt_prob": torch.tensor([[0.75, 0.25]] * b),
            "label": torch.arange(b) % c}


def test_registry_and_kd_method():
    assert {"kd", "odsd", "ce"} <= set(known_methods())
    s, t = Tiny(4, 5, 3, 0), Tiny(4, 6, 3, 1)
    b = _batch()
    m = build_method("kd", MethodOptions(), DIMS)
    out = m.loss(b, s, t)
    assert out["total"].item() == pytest.approx(kd_loss(s(b["weak"]), t(b["weak"]), 4.0).item(), rel=1e-6)
    with pytest.raises(UserError):
        build_method("nope", MethodOptions(), DIMS)


def test_odsd_total_is_the_weighted_sum_and_terms_switch_off():
    s, t = Tiny(4, 5, 3, 0), Tiny(4, 6, 3, 1)
    b = _batch()
    torch.manual_seed(0)
    m = build_method("odsd", MethodOptions(), DIMS)
    out = m.loss(b, s, t)
    assert set(out) == {"total", "lnkd", "self", "rel"}
    assert out["total"].item() == pytest.approx((out["lnkd"] + 0.5 * out["self"] + 1.0 * out["rel"]).item(), rel=1e-6)
    # L_lnkd by hand from the pure function: mean over the two strong views of the stored sparse targets
    z0, z1 = s(b["view0"]), s(b["view1"])
    want = 0.5 * (sparse_kd_loss(z0, b["tgt_idx"], b["tgt_prob"], 4.0) + sparse_kd_loss(z1, b["tgt_idx"], b["tgt_prob"], 4.0))
    assert out["lnkd"].item() == pytest.approx(want.item(), rel=1e-6)
    # L_rel: student features mapped to the teacher's dimension against the teacher's weak-view features
    f_t = t.forward_features(b["weak"])
    w = relation_weights(t(b["weak"]), 0.5)
    g0, g1 = m.rel_map(s.forward_features(b["view0"])), m.rel_map(s.forward_features(b["view1"]))
    want_rel = 0.5 * (relation_loss(g0, f_t, 0.1, w) + relation_loss(g1, f_t, 0.1, w))
    assert out["rel"].item() == pytest.approx(want_rel.item(), rel=1e-5)
    # ablations: each switch removes its term (and its head)
    only = build_method("odsd", _odsd(use_self=False, use_rel=False), DIMS)
    o2 = only.loss(b, s, None)  # stored targets and no relation term: the teacher is not needed
    assert set(o2) == {"total", "lnkd"} and not hasattr(only, "proj")
    assert o2["total"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        _odsd(use_lnkd=False, use_self=False, use_rel=False)


def test_odsd_online_targets_without_selection():
    s, t = Tiny(4, 5, 3, 0), Tiny(4, 6, 3, 1)
    b = _batch()
    for k in ("tgt_idx", "tgt_prob"):
        b.pop(k)
    m = build_method("odsd", _odsd(use_self=False, use_rel=False), DIMS)
    idx, prob = low_noise_targets(t(b["weak"]), 3, 4.0)
    want = 0.5 * (sparse_kd_loss(s(b["view0"]), idx, prob, 4.0) + sparse_kd_loss(s(b["view1"]), idx, prob, 4.0))
    assert m.loss(b, s, t)["total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_ce_method():
    s = Tiny(4, 5, 3, 0)
    b = _batch()
    m = build_method("ce", MethodOptions(), DIMS)
    want = nn.functional.cross_entropy(s(b["weak"]), b["label"])
    assert m.loss(b, s, None)["total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_kd_strong_uses_the_two_strong_views():
    s, t = Tiny(4, 5, 3, 0), Tiny(4, 6, 3, 1)
    b = _batch()
    opts = MethodOptions(kd=type(MethodOptions().kd)(strong=True))
    m = build_method("kd", opts, DIMS)
    assert type(m).views(opts.kd) == 2 and type(m).views(MethodOptions().kd) == 0
    z_t = t(b["weak"])
    want = 0.5 * (kd_loss(s(b["view0"]), z_t, 4.0) + kd_loss(s(b["view1"]), z_t, 4.0))
    assert m.loss(b, s, t)["total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_mix_statistics_moves_channel_moments():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    perm = torch.tensor([1, 0, 3, 2])
    same = mix_statistics(h, perm, torch.ones(4))  # lambda 1: each image keeps its own statistics
    torch.testing.assert_close(same, h, rtol=1e-4, atol=1e-4)
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = mix_statistics(h, perm, lam)
    mu, mu_out = h.mean((2, 3)), out.mean((2, 3))
    want = lam.view(-1, 1) * mu + (1 - lam.view(-1, 1)) * mu[perm]
    torch.testing.assert_close(mu_out, want, rtol=1e-4, atol=1e-4)


class Staged(Tiny):
    """Tiny with a first 'stage' module, where kd3 mixes feature statistics."""

    def __init__(self, *a):
        super().__init__(*a)
        self.layer1 = nn.Identity()

    def forward_features(self, x):
        return self.feat(self.layer1(x).flatten(1))


def test_kd3_terms_and_instance_selection():
    s, t = Staged(4, 5, 3, 0), Tiny(4, 6, 3, 1)
    b = _batch(b=6)
    x = b["weak"]
    torch.manual_seed(0)
    for delta in (0.0, 0.55, 1.0):
        m = build_method("kd3", MethodOptions(kd3=type(MethodOptions().kd3)(delta=delta)), DIMS)
        with torch.no_grad():
            f_t, z_t = t.forward_features(x), t(x)
            z_s = s(x)
        perm, lam = torch.arange(6).flip(0), torch.full((6,), 0.3)
        out = m._losses(s, t, s.layer1, x, f_t, z_t, perm, lam)
        assert out["total"].item() == pytest.approx((out["kd"] + out["feat"] + 0.5 * out["md"]).item(), rel=1e-5)
        conf = (0.5 * (torch.softmax(z_t, 1) + torch.softmax(z_s, 1))).max(1).values
        keep = conf >= delta
        assert out["kept"].item() == pytest.approx(keep.float().mean().item())
        if keep.any():  # L_kd: Hinton KD over the kept images, weighted by the combined confidence
            per = torch.stack([kd_loss(z_s[i:i + 1], z_t[i:i + 1], 4.0) for i in range(6)])
            w = torch.where(keep, conf, torch.zeros_like(conf))
            assert out["kd"].item() == pytest.approx(((w * per).sum() / w.sum()).item(), rel=1e-5)
        else:
            assert out["kd"].item() == 0 and out["feat"].item() == 0
