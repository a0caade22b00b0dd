"""Vol-JEPA pretraining: masks, the data path, the loss, exact resume, DDP on 2 CPU processes,
continuing from a student-only model, config validation and the health monitors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from neurovfm.cli import main as cli_main
from neurovfm.errors import SchemaMismatchError
from neurovfm.models.folder import load_encoder, save_encoder
from neurovfm.pretrain import monitors
from neurovfm.pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, sub_state
from neurovfm.pretrain.config import ConfigError, OptimConfig, config_from_dict, load_config
from neurovfm.pretrain.data import (BatchLoader, DataConfig, DataConfigError, _augment, plan_epoch, select_studies,
                                    series_rng)
from neurovfm.pretrain.jepa import (COVARIANCE_SHARE, JEPA, make_teacher, series_standardise, teacher_targets,
                                   token_histograms, variance_covariance)
from neurovfm.pretrain.loop import Pretrainer, lr_at, momentum_at, pretrain
from neurovfm.pretrain.masks import MaskConfig, make_mask, tube_target
from neurovfm.probe.embed import HISTOGRAM_VIEWS, HistogramFeaturizer
from neurovfm.tokens.normalize import VIEW_STATS, normalize, to_uint8

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_support import SPECS, build_small_cache  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    cache, splits = build_small_cache(str(root))
    return str(root), cache, splits


def cfg_dict(cache, splits, out, **run) -> dict:
    return {
        "model": {"size": "tiny", "encoder": {"width": 48, "depth": 2, "heads": 4},
                  "predictor": {"width": 48, "depth": 1, "heads": 4}},
        "data": {"cache": cache, "splits_csv": splits, "tokens_per_batch": 600},
        "run": {"out": out, "epochs": 3, "monitor_every": 2, "checkpoint_every": 2, "tensorboard": False,
                "deterministic": True, **run},
    }


def write_cfg(path, d) -> str:
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    return str(path)


def ellipsoid(D=10, H=14, W=12) -> np.ndarray:
    g = np.stack(np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij"), -1).reshape(-1, 3)
    r = ((g[:, 0] - (D - 1) / 2) / (D / 2)) ** 2 + ((g[:, 1] - (H - 1) / 2) / (H / 2)) ** 2 + \
        ((g[:, 2] - (W - 1) / 2) / (W / 2)) ** 2
    return g[r < 1]


# -- masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality,ratio", [("CT", 0.20), ("MR", 0.25)])
def test_tube_mask_follows_the_reference_scheme(modality, ratio):
    coords = ellipsoid()
    cfg = MaskConfig()
    rng = np.random.default_rng(0)
    columns = {tuple(c) for c in coords[:, 1:]}
    for _ in range(30):
        tube = tube_target(coords, cfg, np.random.default_rng(rng.integers(1 << 30)))
        cols_in = {tuple(c) for c in coords[tube][:, 1:]}
        assert 0.70 <= len(cols_in) / len(columns) <= 0.75
        # a tube runs through every slice: a column is either wholly in it or wholly out
        assert not any(tuple(c) in cols_in for c in coords[~tube][:, 1:])
        ctx, tgt = make_mask(coords, modality, cfg, rng)
        assert len(np.intersect1d(ctx, tgt)) == 0
        assert len(ctx) + len(tgt) == len(coords)  # targets are the complement of the context
        assert len(ctx) / len(coords) <= ratio * 0.9 + 0.03  # thinned to the ratio, then 10 % dropped
        assert len(tgt) / len(coords) >= 0.75


def test_slab_thinning_removes_contiguous_slices():
    coords = ellipsoid(D=20)
    cfg = MaskConfig(context_drop=0.0)
    rng = np.random.default_rng(1)
    for _ in range(10):
        tube = tube_target(coords, cfg, rng)
        ctx, _ = make_mask(coords, "CT", cfg, np.random.default_rng(rng.integers(1 << 30)))
        removed = np.setdiff1d(np.flatnonzero(~tube), ctx)
        if removed.size:
            depths = np.unique(coords[removed, 0])
            # the removed depths are one run (candidates in those slices all go)
            assert depths.max() - depths.min() + 1 >= depths.size


def test_masks_are_deterministic_per_stream_and_multiblock_works():
    coords = ellipsoid()
    a = make_mask(coords, "CT", MaskConfig(), np.random.default_rng(7))
    b = make_mask(coords, "CT", MaskConfig(), np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    ctx, tgt = make_mask(coords, "MR", MaskConfig(scheme="multiblock"), np.random.default_rng(3))
    assert len(ctx) and len(tgt) and not np.intersect1d(ctx, tgt).size
    ctx, tgt = make_mask(coords[:3], "CT", MaskConfig(), np.random.default_rng(0))  # tiny series
    assert len(ctx) >= 1 and len(tgt) >= 1


# -- data -------------------------------------------------------------------------------------------
def test_reads_only_requested_splits(small):
    _, cache, splits = small
    train = select_studies(DataConfig(cache=cache, splits_csv=splits), 8)
    assert len(train) == sum(1 for s in SPECS if s[3] == "train")
    val = select_studies(DataConfig(cache=cache, splits_csv=splits, splits=("val",)), 8)
    assert {s.study_key for s in val}.isdisjoint({s.study_key for s in train})
    with pytest.raises(DataConfigError, match="splits_csv is required"):
        select_studies(DataConfig(cache=cache), 8)
    with pytest.raises(DataConfigError, match="no series selected"):
        select_studies(DataConfig(cache=cache, splits_csv=splits, splits=("nonexistent",)), 8)


def test_schema_hash_is_checked(small, tmp_path, monkeypatch):
    _, cache, splits = small
    monkeypatch.setattr("neurovfm.pretrain.data.schema_hash", lambda: "0000000000000000")
    with pytest.raises(SchemaMismatchError):
        select_studies(DataConfig(cache=cache, splits_csv=splits), 8)


def test_epoch_plan_new_order_disjoint_ranks_token_budget(small):
    _, cache, splits = small
    studies = select_studies(DataConfig(cache=cache, splits_csv=splits), 8)
    orders = []
    for epoch in range(4):
        plan = plan_epoch(studies, 0, epoch, 1, 600, 4096)[0]
        seq = [s.series_key for b in plan for s in b]
        assert sorted(seq) == sorted(s.series_key for st in studies for s in st.series)  # each once
        for b in plan:
            assert len(b) == 1 or sum(s.n_tokens for s in b) <= 600
        orders.append(seq)
    assert len({tuple(o) for o in orders}) > 1  # a new order every epoch
    two = plan_epoch(studies, 0, 0, 2, 600, 4096)
    assert len(two[0]) == len(two[1])  # equal step counts per rank: DDP never waits forever
    keys = [{s.study_key for b in r for s in b} for r in two]
    assert keys[0].isdisjoint(keys[1])


def test_ct_window_sampling_frequencies():
    probs = (0.70, 0.15, 0.15)
    draws = [series_rng(0, 0, f"{i:032x}").choice(3, p=probs) for i in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, probs, atol=0.03)


def test_flip_mirrors_tokens_and_coordinates():
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, (8, 32, 48), dtype=np.uint8)
    from neurovfm.tokens.patches import patchify, unpatchify

    tok = patchify(vol, (4, 16, 16))
    grid = (2, 2, 3)
    coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    cfg = DataConfig(cache="x", flip_p=1.0)
    ftok, fcoords = _augment(tok, coords, cfg, np.random.default_rng(0), (4, 16, 16))
    order = np.lexsort((fcoords[:, 2], fcoords[:, 1], fcoords[:, 0]))
    back = unpatchify(ftok[order], grid, (4, 16, 16))
    assert np.array_equal(back, vol[:, ::-1, ::-1])  # both in-plane axes mirrored: sides swap


def test_batch_has_consistent_masks(small):
    _, cache, splits = small
    cfg = DataConfig(cache=cache, splits_csv=splits)
    series = [s for st in select_studies(cfg, 8) for s in st.series]
    b = BatchLoader(cfg, MaskConfig(), 0).load(series, 0)
    assert b.packed.n_series == len(series) and b.cu_ctx[-1] == len(b.ctx_idx) and b.cu_tgt[-1] == len(b.tgt_idx)
    for i in range(len(series)):
        s, e = b.packed.cu[i], b.packed.cu[i + 1]
        c = b.ctx_idx[b.cu_ctx[i]:b.cu_ctx[i + 1]]
        t = b.tgt_idx[b.cu_tgt[i]:b.cu_tgt[i + 1]]
        assert ((c >= s) & (c < e)).all() and ((t >= s) & (t < e)).all()
    again = BatchLoader(cfg, MaskConfig(), 0).load(series[::-1], 0)  # masks do not depend on packing
    assert torch.equal(again.packed.split(again.packed.tokens)[-1], b.packed.split(b.packed.tokens)[0])


# -- loss and schedules -------------------------------------------------------------------------------
def _batch_and_model(small, intensity_bins: int = 0):
    """A batch of three series of the small cache and a freshly seeded JEPA for it."""
    _, cache, splits = small
    cfg = load_config_dict(cache, splits, "/nonexistent")
    series = [s for st in select_studies(cfg.data, 8) for s in st.series][:3]
    batch = BatchLoader(cfg.data, cfg.mask, 0).load(series, 0)
    torch.manual_seed(0)
    return cfg, batch, JEPA(cfg.model.encoder_config(), cfg.model.predictor_config(), intensity_bins=intensity_bins)


def test_loss_is_mean_smooth_l1_over_targets(small):
    cfg, batch, m = _batch_and_model(small)
    teacher = make_teacher(m.student)
    target, _ = teacher_targets(teacher, batch)
    loss_sum, pred, z, kl = m(batch, target)
    assert kl is None  # no intensity head by default
    assert z.shape == (int(batch.ctx_idx.numel()), cfg.model.encoder_config().width)  # context features
    expect = torch.nn.functional.smooth_l1_loss(pred, target, reduction="mean") * target.shape[0]
    assert torch.allclose(loss_sum, expect, rtol=1e-5)
    # targets are layer-normed teacher outputs
    assert torch.allclose(target.mean(-1), torch.zeros(target.shape[0]), atol=1e-4)


def test_series_standardise_is_instance_norm_per_series():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 2, 30, 1]
    h = torch.randn(sum(lengths), 12, generator=g) * 3 + torch.randn(12, generator=g)
    cu = [0] + np.cumsum(lengths).tolist()
    out = series_standardise(h, cu)
    for i, n in enumerate(lengths):
        part = h[cu[i]:cu[i + 1]]
        if n > 1:
            want = torch.nn.functional.instance_norm(part.T.unsqueeze(0), eps=1e-5)[0].T
            assert torch.allclose(out[cu[i]:cu[i + 1]], want, atol=1e-5)
        else:  # one token: nothing varies, the target is zero
            assert torch.equal(out[cu[i]:cu[i + 1]], torch.zeros_like(part))
    with pytest.raises(ValueError, match="at least one token"):
        series_standardise(h, [0, 0] + cu[1:])


def test_instance_targets_ignore_what_a_series_shares(small):
    """With ``target_norm: instance`` a vector added to every token of one series leaves the
    targets unchanged (with layer norm it changes them), and targets are the series-standardised
    teacher outputs at the target rows, statistics from all of the series' tokens."""
    _, cache, splits = small
    cfg = load_config_dict(cache, splits, "/nonexistent")
    series = [s for st in select_studies(cfg.data, 8) for s in st.series][:3]
    batch = BatchLoader(cfg.data, cfg.mask, 0).load(series, 0)
    torch.manual_seed(0)
    teacher = make_teacher(JEPA(cfg.model.encoder_config(), cfg.model.predictor_config()).student)
    target, h = teacher_targets(teacher, batch, "instance")
    assert torch.allclose(target, series_standardise(h, batch.packed.cu)[batch.tgt_idx])
    s, e = batch.packed.cu[0], batch.packed.cu[1]
    full = series_standardise(h, batch.packed.cu)[s:e]
    assert torch.allclose(full.mean(0), torch.zeros(h.shape[1]), atol=1e-4)
    raw = h[s:e].float().var(0, unbiased=False)  # unit variance up to eps (a near-constant channel is not blown up)
    assert torch.allclose(full.var(0, unbiased=False), raw / (raw + 1e-5), atol=1e-4)

    class Shifted(torch.nn.Module):  # the same teacher, plus one vector on every token of series 0
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, packed):
            out = teacher(packed).clone()
            out[s:e] += self.shift
            return out

    shift = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(1))
    same, _ = teacher_targets(Shifted(shift), batch, "instance")
    # float32 rounding of h + shift is divided by a channel's spread (>= sqrt(eps)): allow 1e-3
    assert torch.allclose(same, target, atol=1e-3)
    lay, _ = teacher_targets(teacher, batch, "layer")
    lay_shifted, _ = teacher_targets(Shifted(shift), batch, "layer")
    assert not torch.allclose(lay, lay_shifted, atol=1e-2)
    with pytest.raises(ValueError, match="target norm"):
        teacher_targets(teacher, batch, "batch")


def test_target_norm_changes_training_and_is_validated(small, tmp_path):
    _, cache, splits = small
    d = cfg_dict(cache, splits, str(tmp_path / "inst"), epochs=1)
    d["optim"] = {"target_norm": "instance"}
    pretrain(config_from_dict(d), max_steps=3, progress=False)
    pretrain(load_config_dict(cache, splits, str(tmp_path / "plain"), epochs=1), max_steps=3, progress=False)
    wi, _ = _weights(str(tmp_path / "inst"))
    wp, _ = _weights(str(tmp_path / "plain"))
    assert not all(torch.equal(wi[k], wp[k]) for k in wp if k.startswith("student"))
    meta = json.load(open(os.path.join(latest_checkpoint(str(tmp_path / "inst")), "state.json")))
    assert meta["config"]["optim"]["target_norm"] == "instance"
    with pytest.raises(ConfigError, match="target_norm"):
        config_from_dict({"optim": {"target_norm": "batch"}})


def test_variance_covariance_term():
    """Zero for uncorrelated unit-spread features, large for collapsed ones; its gradient spreads
    a collapsed dimension and decorrelates copies of one direction."""
    g = torch.Generator().manual_seed(0)
    white = torch.randn(20000, 16, generator=g) * 1.5
    assert variance_covariance(white).item() < 0.01
    assert variance_covariance(torch.zeros(50, 16)).item() == pytest.approx(1 - 1e-2, abs=1e-3)  # all hinges, no covariance
    one = 2 * torch.randn(500, 1, generator=g).repeat(1, 16)  # rank one: 16 copies of one direction (std > 1)
    want = COVARIANCE_SHARE * (16 * 15) * one[:, 0].var().item() ** 2 / 16
    assert variance_covariance(one).item() == pytest.approx(want, rel=1e-3)
    z = (torch.randn(200, 8, generator=g) * torch.tensor([1.0] * 7 + [0.1])).requires_grad_()
    variance_covariance(z).backward()
    zc = (z - z.mean(0)).detach()
    assert (z.grad[:, 7] * zc[:, 7]).sum() < 0  # descending the gradient widens the narrow dimension
    assert variance_covariance(torch.randn(1, 8)).item() == 0.0  # one token: no statistics, no term


def test_var_cov_weight_changes_training_and_is_logged(small, tmp_path):
    _, cache, splits = small
    d = cfg_dict(cache, splits, str(tmp_path / "vc"), epochs=1)
    d["optim"] = {"var_cov": 1.0}
    pretrain(config_from_dict(d), progress=False)
    plain = pretrain(load_config_dict(cache, splits, str(tmp_path / "plain"), epochs=1), progress=False)
    with open(os.path.join(str(tmp_path / "vc"), "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == plain["step"] and all(float(r["var_cov"]) > 0 for r in rows)
    wv, _ = _weights(str(tmp_path / "vc"))
    wp, _ = _weights(str(tmp_path / "plain"))
    assert not all(torch.equal(wv[k], wp[k]) for k in wp if k.startswith("student"))
    with pytest.raises(ConfigError, match="var_cov"):
        config_from_dict({"optim": {"var_cov": -1}})


@pytest.mark.parametrize("bins", [2, 32, 256])
def test_token_histograms_match_the_histogram_baseline(bins):
    """The auxiliary target's bins are the histogram baseline's: recovered from z-scored tokens of
    series normalised with different views' statistics."""
    g = np.random.default_rng(bins)
    views = ["brain", "mr", "bone", "blood"]
    lengths = [5, 3, 1, 4]
    u8 = [g.integers(0, 256, size=(n, 64), dtype=np.uint8) for n in lengths]
    u8[0][:, :8] = [0, 255, 7, 8, 127, 128, 248, 247]  # bin edges and the ends of the range
    tokens = torch.cat([normalize(u, v) for u, v in zip(u8, views)])
    cu = [0] + np.cumsum(lengths).tolist()
    got = token_histograms(tokens, views, cu, bins)
    ref = HistogramFeaturizer(bins)
    for i, (u, v) in enumerate(zip(u8, views)):
        block = HISTOGRAM_VIEWS.index(v) * bins
        np.testing.assert_allclose(got[cu[i]:cu[i + 1]].numpy(), ref(u, v)[:, block:block + bins], atol=1e-7)
    with pytest.raises(ValueError, match="3 views for 4 series"):
        token_histograms(tokens, views[:3], cu, bins)


@pytest.mark.parametrize("view", sorted(VIEW_STATS))
def test_to_uint8_inverts_normalize_exactly(view):
    u8 = np.arange(256, dtype=np.uint8)
    assert torch.equal(to_uint8(normalize(u8, view), view), torch.arange(256))


def test_intensity_target_is_kl_to_each_context_tokens_histogram(small):
    _, batch, m = _batch_and_model(small, intensity_bins=16)
    target, _ = teacher_targets(make_teacher(m.student), batch)
    _, _, z, kl = m(batch, target)
    # the histograms of the context tokens, binned from all tokens of each series (the same values)
    hist = token_histograms(batch.packed.tokens, batch.views, batch.packed.cu, 16)[batch.ctx_idx]
    q = torch.softmax(m.intensity_head(z), -1).detach()
    expect = sum(float((h[h > 0] * (h[h > 0].log() - qq[h > 0].log())).sum()) for h, qq in zip(hist, q))
    assert kl.item() == pytest.approx(expect, rel=1e-4) and kl.item() > 0
    assert torch.allclose(hist.sum(-1), torch.ones(len(hist)))


def test_intensity_target_changes_training_is_learned_and_logged(small, tmp_path):
    _, cache, splits = small
    d = cfg_dict(cache, splits, str(tmp_path / "it"), epochs=6)
    d["optim"] = {"intensity_target": 1.0, "intensity_bins": 16, "lr": 1e-3}
    pretrain(config_from_dict(d), progress=False)
    d["optim"] = {"lr": 1e-3}
    d["run"]["out"] = str(tmp_path / "plain")
    pretrain(config_from_dict(d), progress=False)
    with open(os.path.join(str(tmp_path / "it"), "metrics.csv")) as fh:
        rows = [(int(r["epoch"]), float(r["intensity_kl"])) for r in csv.DictReader(fh)]
    kl = [v for _, v in rows]
    assert len(kl) >= 6 and min(kl) > 0
    # the head and the features learn the target: the last epochs (the same studies, other masks) score
    # a much lower KL than the first; per-step values vary with the batch (and the batch order with the
    # fixture's random UIDs: 3 epochs gave a later/first ratio of 0.36-0.89), so epochs are compared
    first = np.mean([v for e, v in rows if e == 0])
    later = np.mean([v for e, v in rows if e >= 4])
    assert later < 0.75 * first, (first, later)
    wi, _ = _weights(str(tmp_path / "it"))
    wp, _ = _weights(str(tmp_path / "plain"))
    assert any(k.startswith("intensity_head") for k in wi) and not any(k.startswith("intensity_head") for k in wp)
    assert not all(torch.equal(wi[k], wp[k]) for k in wp if k.startswith("student"))
    enc = load_encoder(os.path.join(str(tmp_path / "it"), "model"))  # the exported encoder has no head
    assert not any("intensity" in k for k in enc.state_dict())
    for bad in ({"intensity_target": -0.1}, {"intensity_bins": 1}, {"intensity_bins": 300}):
        with pytest.raises(ConfigError, match="intensity"):
            config_from_dict({"optim": bad})


def test_resume_from_a_checkpoint_older_than_a_new_setting(small, tmp_path):
    """A checkpoint written before an optimiser setting existed resumes when the run keeps that
    setting's default, and is refused when the run changes it."""
    _, cache, splits = small
    out = str(tmp_path / "old")
    cfg = load_config_dict(cache, splits, out)
    pretrain(cfg, max_steps=2, progress=False)
    state = os.path.join(latest_checkpoint(out), "state.json")
    meta = json.load(open(state))
    del meta["config"]["optim"]["var_cov"]  # as written by a version without it
    json.dump(meta, open(state, "w"))
    assert pretrain(cfg, resume=True, max_steps=1, progress=False)["step"] == 3
    d = cfg_dict(cache, splits, out)
    d["optim"] = {"var_cov": 0.5}
    meta = json.load(open(os.path.join(latest_checkpoint(out), "state.json")))
    assert meta["config"]["optim"]["var_cov"] == 0.0
    with pytest.raises(CheckpointError, match="'optim' changed"):
        pretrain(config_from_dict(d), resume=True, max_steps=1, progress=False)


def load_config_dict(cache, splits, out, **run):
    return config_from_dict(cfg_dict(cache, splits, out, **run))


def test_schedules():
    o = config_from_dict({}).optim
    total = 100
    assert lr_at(0, total, o) == pytest.approx(1e-4)
    assert lr_at(10, total, o) == pytest.approx(3.75e-4)
    assert lr_at(100, total, o) == pytest.approx(1e-6)
    assert momentum_at(0, total, o) == pytest.approx(0.994) and momentum_at(100, total, o) == pytest.approx(1.0)


# -- runs -------------------------------------------------------------------------------------------
def _weights(out):
    t, meta = load_checkpoint(latest_checkpoint(out))
    return {k: v for k, v in t.items() if not k.startswith("rng.")}, meta


def _losses(out):
    with open(os.path.join(out, "metrics.csv")) as fh:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(fh)]


def test_resume_is_exact(small, tmp_path):
    _, cache, splits = small
    a = str(tmp_path / "a")
    full = pretrain(load_config_dict(cache, splits, a), progress=False)
    assert full["step"] == full["total"] and full["model"]
    b = str(tmp_path / "b")
    cfg_b = load_config_dict(cache, splits, b)
    part = pretrain(cfg_b, max_steps=3, progress=False)
    assert part["step"] == 3 and part["model"] is None
    pretrain(cfg_b, resume=True, progress=False)
    wa, ma = _weights(a)
    wb, mb = _weights(b)
    assert ma["step"] == mb["step"] == full["total"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise
    assert _losses(a) == _losses(b)
    # losses fell and the exported model is the EMA teacher
    losses = [float(x) for _, x in _losses(a)]
    assert np.isfinite(losses).all()
    enc = load_encoder(os.path.join(a, "model"))
    teacher = sub_state(wa, "teacher")
    assert all(torch.equal(enc.state_dict()[k], teacher[k]) for k in teacher)


def test_killed_run_resumes_to_the_same_weights(small, tmp_path):
    _, cache, splits = small
    ref = str(tmp_path / "ref")
    pretrain(load_config_dict(cache, splits, ref, checkpoint_every=1), progress=False)
    out = str(tmp_path / "killed")
    cfg = write_cfg(tmp_path / "k.yaml", cfg_dict(cache, splits, out, checkpoint_every=1))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    p = subprocess.Popen([sys.executable, "-m", "neurovfm", "pretrain", cfg, "--quiet"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            ck = latest_checkpoint(out)
        except Exception:
            ck = None
        if ck and int(os.path.basename(ck).split("_")[1]) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = int(os.path.basename(latest_checkpoint(out)).split("_")[1])
    assert cli_main(["pretrain", cfg, "--resume", "--quiet"]) == 0
    w1, _ = _weights(ref)
    w2, meta = _weights(out)
    assert meta["step"] > killed_at or killed_at == meta["total_steps"]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


@pytest.mark.parametrize("var_cov", [0.0, 1.0])
def test_ddp_two_processes_match_one(small, tmp_path, var_cov):
    # with the variance-covariance term the statistic must be taken over both ranks' tokens
    # (one term, gathered), not averaged over per-rank terms, for the step to match; the
    # intensity target (on with the term) is a mean over both ranks' context tokens
    _, cache, splits = small
    d = cfg_dict(cache, splits, str(tmp_path / "unused"))
    d["data"]["tokens_per_batch"] = 100000
    d["optim"] = {"var_cov": var_cov, "intensity_target": 0.5 * var_cov}
    cfg = write_cfg(tmp_path / "ddp.yaml", d)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    one = str(tmp_path / "one.safetensors")
    two = str(tmp_path / "two.safetensors")
    subprocess.run([sys.executable, os.path.join(HERE, "ddp_step.py"), cfg, one], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(HERE, "ddp_step.py"), cfg, two], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-6)
    if var_cov:
        assert a["var_cov"].item() > 0 and torch.allclose(a["var_cov"], b["var_cov"], rtol=1e-5)
        assert a["intensity_kl"].item() > 0 and torch.allclose(a["intensity_kl"], b["intensity_kl"], rtol=1e-5)
    for k in a:
        if k.startswith("grad."):
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), k
    # AdamW's first step moves a weight by lr * g / (|g| + eps) (plus the same decay in both runs):
    # about lr * sign(g), so a gradient at float-order noise (a key bias's is zero in exact
    # arithmetic) may step the two runs apart by up to 2 lr. Each weight may differ by what its two
    # gradients explain, and no more
    lr, eps = OptimConfig().lr, 1e-8
    for k in a:
        if not k.startswith("w."):
            continue
        tol = torch.full_like(a[k], 1e-6)
        g = "grad." + k[2:]
        if g in a:
            step_a, step_b = a[g] / (a[g].abs() + eps), b[g] / (b[g].abs() + eps)
            tol = tol + 1.01 * lr * (step_a - step_b).abs()
        assert ((a[k] - b[k]).abs() <= tol).all(), k


def test_torchrun_pretrain_cli(small, tmp_path):
    _, cache, splits = small
    out = str(tmp_path / "ddp_run")
    cfg = write_cfg(tmp_path / "run.yaml", cfg_dict(cache, splits, out, epochs=2, deterministic=False))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "neurovfm", "pretrain", cfg, "--quiet"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _, meta = _weights(out)
    assert meta["world_size"] == 2 and meta["step"] == meta["total_steps"] > 0
    assert os.path.exists(os.path.join(out, "model", "encoder.safetensors"))


def test_continue_from_student_only_model(small, tmp_path):
    _, cache, splits = small
    cfg = load_config_dict(cache, splits, str(tmp_path / "x"))
    torch.manual_seed(123)
    student = JEPA(cfg.model.encoder_config(), cfg.model.predictor_config()).student
    folder = save_encoder(student, str(tmp_path / "student_only"))
    d = cfg_dict(cache, splits, str(tmp_path / "cont"))
    d["init_from"] = folder
    tr = Pretrainer(config_from_dict(d), progress=False)
    for k, v in student.state_dict().items():
        assert torch.equal(tr.model.student.state_dict()[k], v)
        assert torch.equal(tr.teacher.state_dict()[k], v)
    d["model"]["encoder"]["width"] = 96
    with pytest.raises(Exception, match="differs"):
        Pretrainer(config_from_dict(d), progress=False)


def test_resume_refuses_changed_model(small, tmp_path):
    _, cache, splits = small
    out = str(tmp_path / "r")
    pretrain(load_config_dict(cache, splits, out), max_steps=1, progress=False)
    d = cfg_dict(cache, splits, out)
    d["model"]["encoder"]["depth"] = 3
    with pytest.raises(Exception, match="changed"):
        pretrain(config_from_dict(d), resume=True, progress=False)


# -- config ---------------------------------------------------------------------------------------------
def test_config_errors_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="unknown sections"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="precision"):
        config_from_dict({"run": {"precision": "fp8"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    assert cli_main(["pretrain", str(bad)]) == 2
    assert cli_main(["pretrain", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_configs_are_valid():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.startswith("pretrain"):
            load_config(os.path.join(ROOT, "configs", name))


# -- monitors -------------------------------------------------------------------------------------------
def test_monitors_tell_collapse_and_shortcuts():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(512, 64, generator=g)
    collapsed = torch.randn(512, 1, generator=g) * torch.randn(1, 64, generator=g)
    assert monitors.effective_rank(healthy) > 40 and monitors.effective_rank(collapsed) < 1.5
    assert monitors.output_std(healthy) > 0.9 and monitors.output_std(torch.ones(10, 4)) == 0
    labels = torch.arange(400) % 2 == 0
    separable = torch.randn(400, 16, generator=g) + labels[:, None].float() * 3
    assert monitors.modality_probe_accuracy(separable, labels) > 0.95
    assert abs(monitors.modality_probe_accuracy(torch.randn(400, 16, generator=g), labels) - 0.5) < 0.12


def test_collapse_warning(small, tmp_path):
    _, cache, splits = small
    tr = Pretrainer(load_config_dict(cache, splits, str(tmp_path / "c")), progress=False)
    series = [s for st in tr.studies for s in st.series][:2]
    batch = BatchLoader(tr.cfg.data, tr.cfg.mask, 0).load(series, 0)
    h = torch.randn(batch.n_tokens, 48)
    tr._collect_probe(h, batch)
    tr._monitor(h, h[:5], h[:5], batch)
    tr._collect_probe(h, batch)
    with pytest.warns(UserWarning, match="collapse"):
        tr._monitor(torch.ones_like(h) + 1e-6 * h, h[:5], h[:5], batch)


@pytest.mark.parametrize("intensity", [0.0, 0.5])
def test_fsdp_two_processes_train_and_resume(small, tmp_path, intensity):
    """FSDP (fully_shard) on 2 CPU processes: a run stopped after 2 steps and resumed ends with the
    same step count, a full checkpoint and an exported model as an uninterrupted FSDP run; with the
    intensity target on, its head is in the checkpoint (gathered like the rest), its KL is logged
    on every step, and the exported encoder has no head."""
    _, cache, splits = small
    out = str(tmp_path / "fsdp")
    d = cfg_dict(cache, splits, out, epochs=2, distributed="fsdp")
    if intensity:
        d["optim"] = {"intensity_target": intensity, "intensity_bins": 16}
    cfg = write_cfg(tmp_path / "fsdp.yaml", d)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "neurovfm", "pretrain", cfg, "--quiet"]
    r = subprocess.run(base + ["--max-steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _, meta = _weights(out)
    assert meta["step"] == 2 and meta["world_size"] == 2
    r = subprocess.run(base + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w, meta = _weights(out)
    assert meta["step"] == meta["total_steps"] > 2
    assert any(k.startswith("optim|") for k in w)  # the full optimiser state, gathered from the shards
    enc = load_encoder(os.path.join(out, "model"))
    teacher = sub_state(w, "teacher")
    assert all(torch.equal(enc.state_dict()[k], teacher[k]) for k in teacher)
    losses = [float(x) for _, x in _losses(out)]
    assert len(losses) == meta["total_steps"] and np.isfinite(losses).all()
    assert any(k.startswith("intensity_head") for k in w) == bool(intensity)
    assert not any("intensity" in k for k in enc.state_dict())
    if intensity:
        with open(os.path.join(out, "metrics.csv")) as fh:
            kl = [float(r["intensity_kl"]) for r in csv.DictReader(fh)]
        assert len(kl) == meta["total_steps"] and min(kl) > 0 and np.isfinite(kl).all()


def test_resume_does_not_depend_on_the_callers_thread_setting(small, tmp_path):
    """A run whose first steps ran in a fresh process and whose rest runs in a process that had
    called torch.set_num_threads (to the same count) ends bit-equal to one run straight through
    in that process: the loop puts every run in the same explicit thread state."""
    _, cache, splits = small
    n = torch.get_num_threads()
    torch.set_num_threads(n)  # what any earlier caller (a test, a notebook) may have done
    ref = str(tmp_path / "ref")
    pretrain(load_config_dict(cache, splits, ref, checkpoint_every=1), progress=False)
    out = str(tmp_path / "split")
    cfg = write_cfg(tmp_path / "s.yaml", cfg_dict(cache, splits, out, checkpoint_every=1))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-m", "neurovfm", "pretrain", cfg, "--quiet", "--max-steps", "3"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cli_main(["pretrain", cfg, "--resume", "--quiet"]) == 0
    w1, _ = _weights(ref)
    w2, _ = _weights(out)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
