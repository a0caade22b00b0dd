"""Study-level heads: attention is a distribution per class per study, a study's output does not
depend on its batch-mates, a head learns a signal carried by a few tokens and attends to them,
and saved heads reload exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from neurovfm.eval.metrics import auroc
from neurovfm.models.folder import ModelFolderError
from neurovfm.probe.heads import HeadConfig, HeadEnsemble, build_head, contribution_bias, token_contributions
from neurovfm.probe.train import HeadTrainConfig, fit_head, load_head, predict, predict_members, save_head

KINDS = ["gated", "abmil", "mean", "topk"]
# every kind alone, every kind on standardised features, and seed ensembles (HeadEnsemble) of two kinds
CONFIGS = ([HeadConfig(kind=k) for k in KINDS] + [HeadConfig(kind=k, standardize=True) for k in KINDS]
           + [HeadConfig(kind="gated", ensemble=3), HeadConfig(kind="topk", ensemble=2, standardize=True)])


def _cid(c: HeadConfig) -> str:
    return f"{c.kind}x{c.ensemble}" + ("-std" if c.standardize else "")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with more than one intra-op thread on a busy CPU the threads
    wait on each other and training runs ~25x slower (measured: 3 epochs 28 s vs 1.1 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(rng, lengths, dim):
    feats = torch.tensor(rng.normal(size=(sum(lengths), dim)), dtype=torch.float32)
    cu = torch.tensor([0] + np.cumsum(lengths).tolist())
    return feats, cu


@pytest.mark.parametrize("hc", CONFIGS, ids=_cid)
def test_attention_sums_to_one_per_class_per_study(hc):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    head = build_head(hc, 24, 5).eval()
    lengths = rng.integers(1, 60, size=7).tolist()
    feats, cu = _batch(rng, lengths, 24)
    logits, attn = head(feats, cu)
    assert logits.shape == (7, 5) and attn.shape == (sum(lengths), 5)
    for b in range(7):
        s = attn[cu[b]:cu[b + 1]].sum(0)
        torch.testing.assert_close(s, torch.ones(5), atol=1e-5, rtol=0)
    assert (attn >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_studys_output_does_not_depend_on_its_batch(kind):
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    head = build_head(HeadConfig(kind=kind), 16, 3).eval()
    feats, cu = _batch(rng, [30, 5, 44], 16)
    logits, attn = head(feats, cu)
    alone, a1 = head(feats[30:35], torch.tensor([0, 5]))
    torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, attn[30:35], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hc", CONFIGS, ids=_cid)
def test_token_contributions_add_up_to_the_logit(hc):
    """bias + the study's tokens' contributions == the head's logit, for every head kind and for
    ensembles (so a contribution map is an exact decomposition, not a heuristic)."""
    rng = np.random.default_rng(5)
    torch.manual_seed(0)
    head = build_head(hc, 20, 4).eval()
    with torch.no_grad():  # non-trivial norm and bias parameters, and standardisation statistics
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in head.named_buffers():
            b.mul_(1 + 0.5 * torch.rand_like(b)) if name.endswith("inv_std") else b.add_(torch.randn_like(b))
    feats, cu = _batch(rng, [17, 40, 3], 20)
    logits, _ = head(feats, cu)
    contrib = token_contributions(head, feats, cu)
    assert contrib.shape == (60, 4)
    summed = torch.stack([contrib[cu[b]:cu[b + 1]].sum(0) for b in range(3)]) + contribution_bias(head)
    torch.testing.assert_close(summed, logits, atol=1e-4, rtol=1e-4)


def _signal_bags(rng, n, dim, direction):
    """Bags of 40-120 noise tokens; in positive studies 3 tokens carry ``direction``."""
    bags, y, where = [], [], []
    for _ in range(n):
        k = int(rng.integers(40, 120))
        x = rng.normal(size=(k, dim)).astype(np.float32)
        pos = rng.random() < 0.4
        idx = rng.choice(k, 3, replace=False) if pos else np.array([], int)
        x[idx] += 4.0 * direction
        bags.append(x)
        y.append([float(pos), float(rng.random() < 0.5)])  # label 2 is pure noise
        where.append(idx)
    return bags, np.array(y, np.float32), where


@pytest.mark.parametrize("kind", ["gated", "abmil", "topk"])
def test_learns_a_few_token_signal_and_attends_to_it(kind):
    rng = np.random.default_rng(2)
    dim = 16
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    tr, ytr, _ = _signal_bags(rng, 160, dim, direction)
    va, yva, _ = _signal_bags(rng, 60, dim, direction)
    te, yte, where = _signal_bags(rng, 80, dim, direction)
    ytr[::7, 1] = np.nan  # unknown labels are masked, not read as negative
    head, hist = fit_head(tr, ytr, va, yva, HeadTrainConfig(epochs=25, seed=0, lr=3e-3), HeadConfig(kind=kind, dropout=0.0))
    assert len(hist) >= 1 and all(np.isfinite(h["train_loss"]) for h in hist)
    logits, attn = predict(head, te)
    assert auroc(yte[:, 0], logits[:, 0]) > 0.9
    share = [a[w, 0].sum() for a, w, t in zip(attn, where, yte[:, 0]) if t == 1]
    assert np.median(share) > 0.5  # 3 of ~80 tokens hold most of the attention
    hits = []  # the most positive contribution points at a signal token
    for x, w, t in zip(te, where, yte[:, 0]):
        if t == 1:
            c = token_contributions(head, torch.from_numpy(x), torch.tensor([0, len(x)]))[:, 0]
            hits.append(int(c.argmax()) in set(w.tolist()))
    assert np.mean(hits) > 0.9


def test_selection_uses_validation_and_is_deterministic():
    rng = np.random.default_rng(3)
    direction = np.ones(8, np.float32) / np.sqrt(8)
    tr, ytr, _ = _signal_bags(rng, 80, 8, direction)
    va, yva, _ = _signal_bags(rng, 40, 8, direction)
    cfg = HeadTrainConfig(epochs=6, seed=5)
    h1, hist1 = fit_head(tr, ytr, va, yva, cfg)
    h2, hist2 = fit_head(tr, ytr, va, yva, cfg)
    assert hist1 == hist2
    for k, v in h1.state_dict().items():
        assert torch.equal(v, h2.state_dict()[k])
    best = max(h["val_macro_auroc"] for h in hist1)
    lv, _ = predict(h1, va)
    from neurovfm.probe.train import val_macro_auroc
    assert val_macro_auroc(yva, lv) == pytest.approx(best)


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    head = build_head(HeadConfig(kind="gated"), 12, 2).eval()
    bags = [rng.normal(size=(int(rng.integers(5, 30)), 12)).astype(np.float32) for _ in range(5)]
    before, _ = predict(head, bags)
    save_head(str(tmp_path), head, HeadConfig(kind="gated"), ["a", "b"], calibration={"kind": "platt", "a": [1, 1],
              "b": [0, 0]}, thresholds={"a": 0.3, "b": float("inf")}, name="head_ct")
    again, meta = load_head(str(tmp_path), "head_ct")
    after, _ = predict(again, bags)
    np.testing.assert_array_equal(before, after)
    assert meta["labels"] == ["a", "b"] and meta["thresholds"]["b"] == float("inf")
    with pytest.raises(ModelFolderError, match="no head named"):
        load_head(str(tmp_path), "head_mr")


def test_seed_ensemble_is_the_mean_of_heads_trained_with_consecutive_seeds():
    """``ensemble = 3``: member m is exactly the single head fitted with seed ``seed + m`` (each
    stopped on validation by itself), the ensemble's logits are their mean, and the members differ
    (otherwise an ensemble would average one head three times)."""
    rng = np.random.default_rng(6)
    direction = np.ones(8, np.float32) / np.sqrt(8)
    tr, ytr, _ = _signal_bags(rng, 60, 8, direction)
    va, yva, _ = _signal_bags(rng, 30, 8, direction)
    te, _, _ = _signal_bags(rng, 20, 8, direction)
    cfg = HeadTrainConfig(epochs=4, seed=7)
    ens, hist = fit_head(tr, ytr, va, yva, cfg, HeadConfig(kind="gated", ensemble=3))
    assert isinstance(ens, HeadEnsemble) and len(ens.members) == 3
    assert sorted({r["member"] for r in hist}) == [0, 1, 2]
    singles = [fit_head(tr, ytr, va, yva, replace(cfg, seed=7 + m), HeadConfig(kind="gated"))[0] for m in range(3)]
    member_logits = []
    for m, single in enumerate(singles):
        for k, v in single.state_dict().items():
            assert torch.equal(v, ens.members[m].state_dict()[k]), (m, k)
        member_logits.append(predict(single, te)[0])
    logits, attn = predict(ens, te)
    np.testing.assert_allclose(logits, np.mean(member_logits, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(member_logits[0], member_logits[1])
    for a in attn:
        np.testing.assert_allclose(a.sum(0), 1.0, atol=1e-5)
    # one pass per member gives the ensemble's own outputs bit for bit, and each member's logits
    one_logits, one_attn, members = predict_members(ens, te)
    np.testing.assert_array_equal(one_logits, logits)
    for a, b in zip(one_attn, attn):
        np.testing.assert_array_equal(a, b)
    assert members.shape == (3, len(te), ytr.shape[1])
    for m in range(3):
        np.testing.assert_array_equal(members[m], member_logits[m])


def test_ensemble_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    torch.manual_seed(0)
    hc = HeadConfig(kind="abmil", ensemble=2)
    head = build_head(hc, 12, 2).eval()
    with torch.no_grad():  # members differ
        for p in head.members[1].parameters():
            p.add_(0.2 * torch.randn_like(p))
    bags = [rng.normal(size=(int(rng.integers(5, 30)), 12)).astype(np.float32) for _ in range(4)]
    before, _ = predict(head, bags)
    save_head(str(tmp_path), head, hc, ["a", "b"], name="head_mr")
    again, meta = load_head(str(tmp_path), "head_mr")
    assert isinstance(again, HeadEnsemble) and meta["head"]["ensemble"] == 2 and meta["dim"] == 12
    np.testing.assert_array_equal(before, predict(again, bags)[0])


def test_ensemble_size_is_validated():
    with pytest.raises(ValueError, match="ensemble"):
        HeadConfig(ensemble=0)


def test_standardizer_statistics_come_from_the_training_tokens_and_floor_dead_dimensions():
    rng = np.random.default_rng(9)
    bags = [rng.normal(3.0, 2.0, size=(int(rng.integers(5, 50)), 6)).astype(np.float32) for _ in range(9)]
    for b in bags:
        b[:, 5] = 7.0  # a dead dimension
    head = build_head(HeadConfig(kind="mean", standardize=True), 6, 2)
    head.pre.fit(bags)
    x = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(head.pre.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.pre.inv_std.numpy()[:5], 1 / x.std(0)[:5], rtol=1e-4)
    rms = np.sqrt(x.var(0).mean())  # the dead dimension's spread is floored at 1 % of the RMS spread
    assert head.pre.inv_std[5].item() == pytest.approx(1 / (0.01 * rms), rel=1e-4)
    z = head.pre(torch.from_numpy(np.concatenate(bags)))
    np.testing.assert_allclose(z[:, :5].mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, :5].std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="std_floor"):
        HeadConfig(standardize=True, std_floor=0.0)


@pytest.mark.parametrize("kind", ["gated", "mean"])
def test_standardised_heads_do_not_care_how_each_feature_dimension_is_scaled(kind):
    """Features rescaled and shifted per dimension (what separates a collapsed encoder's few
    loud dimensions from its quiet ones) train the same standardised head to the same logits;
    without standardisation they do not. The statistics are the training split's only."""
    rng = np.random.default_rng(10)
    dim = 8
    direction = np.zeros(dim, np.float32)
    direction[2] = 1.0
    tr, ytr, _ = _signal_bags(rng, 60, dim, direction)
    va, yva, _ = _signal_bags(rng, 30, dim, direction)
    te, _, _ = _signal_bags(rng, 20, dim, direction)
    scale = rng.uniform(0.2, 5.0, size=dim).astype(np.float32)
    scale[2] = 0.05  # the signal dimension is a quiet one
    shift = rng.normal(0, 3, size=dim).astype(np.float32)

    def warp(bags):
        return [b * scale + shift for b in bags]

    cfg = HeadTrainConfig(epochs=4, seed=3)
    std = HeadConfig(kind=kind, standardize=True, dropout=0.0)
    h1, _ = fit_head(tr, ytr, va, yva, cfg, std)
    h2, _ = fit_head(warp(tr), ytr, warp(va), yva, cfg, std)
    np.testing.assert_allclose(predict(h1, te)[0], predict(h2, warp(te))[0], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(h2.pre.mean.numpy(), np.concatenate(warp(tr)).mean(0), rtol=1e-4, atol=1e-4)
    plain = HeadConfig(kind=kind, dropout=0.0)
    p1, _ = fit_head(tr, ytr, va, yva, cfg, plain)
    p2, _ = fit_head(warp(tr), ytr, warp(va), yva, cfg, plain)
    assert np.abs(predict(p1, te)[0] - predict(p2, warp(te))[0]).max() > 0.05


def test_ensemble_members_share_one_standardiser_fit(monkeypatch):
    """Every member standardises with the same training-token statistics, fitted once (member 0)
    rather than once per member; each member's logits equal a single head trained with its seed."""
    from neurovfm.probe.heads import FeatureStandardizer
    rng = np.random.default_rng(12)
    bags = [rng.normal(2, 4, size=(int(rng.integers(5, 30)), 10)).astype(np.float32) for _ in range(12)]
    y = np.array([[i % 2, (i // 3) % 2] for i in range(12)], np.float32)
    fits = []
    real_fit = FeatureStandardizer.fit
    monkeypatch.setattr(FeatureStandardizer, "fit", lambda self, b: fits.append(1) or real_fit(self, b))
    cfg = HeadTrainConfig(epochs=2, seed=4)
    ens, _ = fit_head(bags, y, bags, y, cfg, HeadConfig(kind="gated", standardize=True, ensemble=3))
    assert len(fits) == 1
    for m, member in enumerate(ens.members):
        np.testing.assert_array_equal(member.pre.mean.numpy(), ens.members[0].pre.mean.numpy())
        np.testing.assert_array_equal(member.pre.inv_std.numpy(), ens.members[0].pre.inv_std.numpy())
        alone, _ = fit_head(bags, y, bags, y, HeadTrainConfig(epochs=2, seed=4 + m),
                            HeadConfig(kind="gated", standardize=True))
        np.testing.assert_array_equal(predict(member, bags)[0], predict(alone, bags)[0])
    assert len(fits) == 4  # the three single heads fitted their own


def test_standardised_head_saves_and_reloads_its_statistics(tmp_path):
    rng = np.random.default_rng(11)
    bags = [rng.normal(5, 3, size=(int(rng.integers(5, 30)), 12)).astype(np.float32) for _ in range(6)]
    y = np.array([[i % 2, (i // 2) % 2] for i in range(6)], np.float32)
    hc = HeadConfig(kind="gated", standardize=True)
    head, _ = fit_head(bags, y, bags, y, HeadTrainConfig(epochs=2, seed=0), hc)
    assert not torch.allclose(head.pre.mean, torch.zeros(12))
    save_head(str(tmp_path), head, hc, ["a", "b"])
    again, meta = load_head(str(tmp_path))
    assert meta["head"]["standardize"] is True
    torch.testing.assert_close(again.pre.inv_std, head.pre.inv_std, atol=0, rtol=0)
    np.testing.assert_array_equal(predict(head, bags)[0], predict(again, bags)[0])
