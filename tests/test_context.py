"""Token features with their neighbourhood (`embed --append-context`, `neurovfm add-context`): the
neighbourhood mean is what a brute-force search over the grid gives, independent of token order
and grid offset; embedding with the option and deriving from a plain folder give the same bytes;
the folder names its radius and refuses to be resumed with another; heads fitted on such features
make `analyze` rebuild them (external evaluation's check: tests/test_readout.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from neurovfm.cli import main as cli_main
from neurovfm.probe.context import ContextError, append_context, derive_context_store, neighbourhood_mean
from neurovfm.probe.embed import EmbedConfig, FeatureStore, FeatureStoreError, embed, encoder_id

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_support import small_cache_with_model  # noqa: E402


def _brute(feats: np.ndarray, coords: np.ndarray, radius: int) -> np.ndarray:
    out = np.empty_like(feats, dtype=np.float64)
    for i in range(len(feats)):
        d = np.abs(coords - coords[i]).max(1)
        nb = (d <= radius) & (d > 0)
        out[i] = feats[nb].mean(0) if nb.any() else feats[i]
    return out


def test_neighbourhood_mean_by_hand():
    f = np.array([[1.0], [2.0], [4.0]], np.float32)
    c = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 3]])
    # token 0 sees token 1; token 1 sees token 0 (token 2 is two steps away); token 2 is alone
    np.testing.assert_array_equal(neighbourhood_mean(f, c, 1), [[2.0], [1.0], [4.0]])
    np.testing.assert_array_equal(neighbourhood_mean(f, c, 2), [[2.0], [2.5], [2.0]])
    # a diagonal neighbour counts (Chebyshev distance)
    np.testing.assert_array_equal(neighbourhood_mean(f[:2], np.array([[0, 0, 0], [1, 1, 1]]), 1), [[2.0], [1.0]])


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_neighbourhood_mean_matches_brute_force_and_ignores_order_and_offset(radius, seed):
    rng = np.random.default_rng(seed)
    cells = rng.choice(6 * 7 * 5, size=80, replace=False)
    c = np.stack(np.unravel_index(cells, (6, 7, 5)), 1)
    f = rng.normal(size=(80, 5)).astype(np.float32)
    got = neighbourhood_mean(f, c, radius)
    np.testing.assert_allclose(got, _brute(f, c, radius), atol=1e-5)
    perm = rng.permutation(80)
    np.testing.assert_allclose(neighbourhood_mean(f[perm], c[perm] + np.array([3, 0, 11]), radius), got[perm],
                               atol=1e-5)


def test_bad_input_is_refused_by_name():
    f = np.zeros((2, 3), np.float32)
    with pytest.raises(ContextError, match="share a grid position"):
        neighbourhood_mean(f, np.array([[1, 2, 3], [1, 2, 3]]), 1)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ContextError, match="radius"):
            neighbourhood_mean(f, np.array([[0, 0, 0], [0, 0, 1]]), bad)
    with pytest.raises(ContextError, match="must match"):
        neighbourhood_mean(f, np.zeros((3, 3), int), 1)
    assert neighbourhood_mean(np.zeros((0, 3), np.float32), np.zeros((0, 3), int), 1).shape == (0, 3)
    with pytest.raises(ValueError, match="radius"):
        EmbedConfig(append_context=9)


def test_append_context_keeps_the_features_and_rounds_the_mean_as_a_store_does():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(4, 2)).astype(np.float32)
    c = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [5, 5, 5]])
    (out,) = append_context([f], [c], 1)
    np.testing.assert_array_equal(out[:, :2], f)
    np.testing.assert_array_equal(out[:, 2:], neighbourhood_mean(f.astype(np.float16), c, 1))
    assert append_context([f], [c], None)[0] is f


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return small_cache_with_model(tmp_path_factory.mktemp("context"))


def test_embed_with_context_equals_deriving_it_from_a_plain_folder(setup):
    root, cache, _, model = setup
    plain, direct, derived = str(root / "plain"), str(root / "direct"), str(root / "derived")
    cfg = dict(tokens_per_batch=1500, part_tokens=2500, append_histogram=8)
    embed(model, cache, plain, EmbedConfig(**cfg), progress=False)
    assert cli_main(["embed", model, cache, direct, "--append-histogram", "8", "--append-context", "1",
                     "--tokens-per-batch", "1500", "--part-tokens", "2500", "--quiet"]) == 0
    assert cli_main(["add-context", plain, derived, "--radius", "1", "--quiet"]) == 0
    a, d, e = FeatureStore(plain), FeatureStore(direct), FeatureStore(derived)
    assert a.meta["n_parts"] > 1  # the parts are cut across views of several batches
    assert d.dim == e.dim == 2 * a.dim and d.context_radius == e.context_radius == 1 and a.context_radius is None
    want = {"encoder_id": a.meta["encoder_id"], "readout_layers": None, "histogram_bins": 8}
    assert a.head_features() == want
    assert d.head_features() == e.head_features() == {**want, "context_radius": 1}
    for va, vd, ve in zip(a.views, d.views, e.views):
        assert (va.series_key, va.view) == (vd.series_key, vd.view) == (ve.series_key, ve.view)
        np.testing.assert_array_equal(np.asarray(vd.feats), np.asarray(ve.feats))
        np.testing.assert_array_equal(np.asarray(vd.feats)[:, :a.dim], np.asarray(va.feats))
        ctx = neighbourhood_mean(np.asarray(va.feats), np.asarray(va.coords), 1).astype(np.float16)
        np.testing.assert_array_equal(np.asarray(vd.feats)[:, a.dim:], ctx)
        np.testing.assert_array_equal(np.asarray(vd.coords), np.asarray(va.coords))
        np.testing.assert_array_equal(np.asarray(vd.kinds), np.asarray(va.kinds))
    # resuming with another radius, or deriving from a derived folder or into the source, is refused
    with pytest.raises(FeatureStoreError, match="context_radius"):
        embed(model, cache, direct, EmbedConfig(**cfg, append_context=2), progress=False)
    with pytest.raises(FeatureStoreError, match="context_radius"):
        derive_context_store(plain, derived, 2, progress=False)
    with pytest.raises(ContextError, match="already holds"):
        derive_context_store(derived, str(root / "twice"), 1, progress=False)
    with pytest.raises(ContextError, match="new folder"):
        derive_context_store(plain, plain, 1, progress=False)
    assert cli_main(["add-context", str(root / "nothing"), str(root / "x"), "--quiet"]) == 2


def test_analyze_rebuilds_the_neighbourhood_for_heads_fitted_on_it(tmp_path):
    from analyze_support import head_volume, make_model, write_nifti_study

    from neurovfm.analyze.pipeline import Analyzer, read_study
    from neurovfm.models.folder import read_config, update_config
    from neurovfm.probe.heads import HeadConfig, build_head
    from neurovfm.probe.train import save_head

    folder = make_model(str(tmp_path / "m"), depth=2, ood=False)
    vol, aff = head_volume(shape=(80, 96, 64), spacing=(2.0, 2.0, 2.5), modality="MR", seed=4)
    study = write_nifti_study(str(tmp_path / "study"), vol, aff, "MR", name="T1w")
    an = Analyzer(folder)
    group, _ = read_study(study, an.cfg)
    base = an.score("MR", group)
    labels = read_config(folder)["heads"]["head_mr"]["labels"]
    dim = base.view_features[0].shape[1]
    torch.manual_seed(0)
    wide = build_head(HeadConfig(kind="mean"), 2 * dim, len(labels)).eval()
    save_head(folder, wide, HeadConfig(kind="mean"), labels, name="head_mr",
              features={"encoder_id": encoder_id(folder), "readout_layers": None, "histogram_bins": None,
                        "context_radius": 2})
    update_config(folder, ood={})
    got = Analyzer(folder).score("MR", group)
    coords = [np.asarray(s.ts.coords) for s in group]
    bag = np.concatenate([np.concatenate([f, neighbourhood_mean(f.astype(np.float16), c, 2)], 1)
                          for f, c in zip(base.view_features, coords)])
    with torch.no_grad():
        logits, _ = wide(torch.from_numpy(bag.astype(np.float32)), torch.tensor([0, len(bag)]))
    np.testing.assert_allclose(got.p_raw, torch.sigmoid(logits[0]).double().numpy(), atol=1e-6)
    for a, b in zip(got.view_features, base.view_features):  # the report's input stays the encoder's
        np.testing.assert_allclose(a, b, atol=1e-6)
    # a folder whose head records an impossible radius is refused when loaded, naming the folder
    from neurovfm.analyze.pipeline import AnalyzeError

    heads = read_config(folder)["heads"]
    heads["head_mr"]["features"]["context_radius"] = 9
    update_config(folder, heads=heads)
    with pytest.raises(AnalyzeError, match="head_mr's features record a bad neighbourhood: .*not 9"):
        Analyzer(folder)
