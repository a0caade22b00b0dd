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
from neurovfm.probe.context import (ContextError, append_context, cross_series_mean, derive_context_store,
                                     neighbourhood_mean)
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
    radius = heads["head_mr"]["features"]["context_radius"]
    heads["head_mr"]["features"]["context_radius"] = 9
    update_config(folder, heads=heads)
    with pytest.raises(AnalyzeError, match="head_mr's features record a bad neighbourhood or cross-series "
                                           "distance: .*not 9"):
        Analyzer(folder)
    heads["head_mr"]["features"].update(context_radius=radius, cross_series_mm=100.0)  # and an impossible distance
    update_config(folder, heads=heads)
    with pytest.raises(AnalyzeError, match="head_mr's features record .* cross-series distance: .*not 100"):
        Analyzer(folder)


# -- across the study's series (`add-context --cross-series`) ------------------------------------
def _brute_cross(feats, centres, series, max_mm):
    out = []
    for i in range(len(feats)):
        o = np.empty_like(feats[i], dtype=np.float64)
        for t in range(len(feats[i])):
            got = []
            for j in range(len(feats)):
                if series[j] == series[i]:
                    continue
                d = np.linalg.norm(centres[j] - centres[i][t], axis=1)
                if d.min() <= max_mm + 1e-3:
                    got.append(feats[j][d <= d.min() + 1e-3].mean(0))
            o[t] = np.mean(got, 0) if got else feats[i][t]
        out.append(o)
    return out


def test_cross_series_mean_by_hand():
    # views 0 and 1: two windows of one CT-like series (never each other's partner); view 2: another
    # series, with one token near view 0's first token and one far from everything
    f = [np.array([[1.0], [2.0]], np.float32), np.array([[10.0], [20.0]], np.float32),
         np.array([[100.0], [7.0]], np.float32)]
    c = [np.array([[0.0, 0, 0], [16, 0, 0]]), np.array([[0.0, 0, 0], [16, 0, 0]]),
         np.array([[0.0, 5, 0], [60, 0, 0]])]
    got = cross_series_mean(f, c, ["a", "a", "b"], 16.0)
    # token 0 is 5 mm from view 2's first token; token 1 is 16.8 mm from it: too far, so its own features
    np.testing.assert_array_equal(got[0], [[100.0], [2.0]])
    np.testing.assert_array_equal(got[1], [[100.0], [20.0]])
    np.testing.assert_array_equal(got[2], [[1.0 / 2 + 10.0 / 2], [7.0]])  # nearest of each other view; alone: own
    np.testing.assert_array_equal(cross_series_mean(f, c, ["a", "a", "b"], 4.0)[0], [[1.0], [2.0]])  # too far: own
    # a token equally far from two tokens of another view gets their mean, whatever their order
    ft, ct = [np.array([[1.0]], np.float32), np.array([[4.0], [8.0], [50.0]], np.float32)], \
        [np.zeros((1, 3)), np.array([[8.0, 0, 0], [-8.0, 0, 0], [0, 0, 9.0]])]
    np.testing.assert_array_equal(cross_series_mean(ft, ct, ["a", "b"])[0], [[6.0]])
    np.testing.assert_array_equal(cross_series_mean([ft[0], ft[1][::-1]], [ct[0], ct[1][::-1]], ["a", "b"])[0],
                                  [[6.0]])
    # the limit is inclusive: a partner exactly 16 mm away counts
    np.testing.assert_array_equal(cross_series_mean(ft, [ct[0], ct[1] * 2], ["a", "b"])[0], [[6.0]])
    # one series only: every token keeps its own features
    np.testing.assert_array_equal(cross_series_mean(f[:2], c[:2], ["a", "a"])[1], f[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_series_mean_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_views = 4
    f = [rng.normal(size=(int(rng.integers(5, 30)), 3)).astype(np.float32) for _ in range(n_views)]
    c = [rng.uniform(-40, 40, size=(len(x), 3)) for x in f]
    series = ["s0", "s1", "s1", "s2"]
    for a, b in zip(cross_series_mean(f, c, series, 16.0), _brute_cross(f, c, series, 16.0)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cross_series_bad_input_is_refused_by_name():
    f = [np.zeros((2, 3), np.float32)]
    for bad in (0, -1, 100, True, "16"):
        with pytest.raises(ContextError, match="cross-series distance"):
            cross_series_mean(f, [np.zeros((2, 3))], ["a"], bad)
    with pytest.raises(ContextError, match="must match"):
        cross_series_mean(f, [np.zeros((3, 3))], ["a"])
    with pytest.raises(ContextError, match="views"):
        cross_series_mean(f, [np.zeros((2, 3))], ["a", "b"])


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """A cache with one MR study of two series (axial and coronal, one frame of reference) and one
    CT study (one series, several windows), a random-init encoder, and the DICOM folder of the MR study."""
    from neurovfm.ingest.pipeline import IngestOptions, run_ingest
    from neurovfm.privacy.keys import Keyer
    from neurovfm.synth.dicom_writer import Identity, SeriesSpec
    from neurovfm.synth.phantom import write_phantom_series

    root = tmp_path_factory.mktemp("cross")
    mr = Identity(patient_id="PT1", study_description="MR HEAD")
    for k, (plane, n) in enumerate((("axial", 18), ("coronal", 22))):
        spec = SeriesSpec(modality="MR", series_description=f"T{k + 1} {plane}", series_number=k + 1,
                          frame_of_reference_uid="1.2.3.4", repetition_time=500.0 + 2000 * k, echo_time=10.0 + 80 * k)
        write_phantom_series(str(root / "dicom" / "mr" / f"s{k}"), plane, n=n, rows=160, cols=150, step=4.0,
                             modality="MR", identity=mr, spec=spec, seed=k)
    write_phantom_series(str(root / "dicom" / "ct" / "s0"), "axial", n=20, rows=160, cols=150, step=4.0,
                         modality="CT", identity=Identity(patient_id="PT2"), seed=5)
    cache = str(root / "cache")
    run_ingest(str(root / "dicom"), cache, IngestOptions(progress=False), keyer=Keyer(b"cross-test"))
    model = str(root / "model")
    assert cli_main(["init-model", model, "--size", "tiny", "--seed", "0"]) == 0
    return root, cache, model


def test_derived_cross_series_features_are_the_studys_co_located_means(two_series):
    from neurovfm.explain.maps import token_centres_ras
    from neurovfm.tokens.cache import TokenCache

    root, cache, model = two_series
    plain, derived = str(root / "plain"), str(root / "xs")
    # part_tokens below any view's token count: every view gets its own part whatever order the
    # (random) DICOM UIDs give the series, so the study's two MR series are always stored apart
    embed(model, cache, plain, EmbedConfig(tokens_per_batch=600, part_tokens=16, append_histogram=8), progress=False)
    assert cli_main(["add-context", plain, derived, "--radius", "1", "--cross-series", "--cache", cache,
                     "--quiet"]) == 0
    a, d = FeatureStore(plain), FeatureStore(derived)
    assert d.dim == 3 * a.dim and d.context_radius == 1 and d.cross_series_mm == 16.0
    assert d.head_features() == {**a.head_features(), "context_radius": 1, "cross_series_mm": 16.0}
    c = TokenCache(cache)
    mr = [k for k in a.studies() if a.modality(k) == "MR"]
    assert len(mr) == 1 and len({v.series_key for v in a.bag_views(mr[0])}) == 2
    # the two MR series sit in different parts: each view is paired with its study wherever stored
    from neurovfm.probe.embed import read_part

    part_of = {r["series_key"]: i for i in range(a.meta["n_parts"]) for r in read_part(plain, i, a.dim)[0]}
    assert len({part_of[v.series_key] for v in a.bag_views(mr[0])}) == 2
    moved = 0
    for k in a.studies():
        views = a.bag_views(k)
        centres = [token_centres_ras(c.get(v.series_key).grid_affine_array, np.asarray(v.coords)) for v in views]
        want = _brute_cross([np.asarray(v.feats, np.float32) for v in views], centres,
                            [v.series_key for v in views], 16.0)
        for v, w, dv in zip(views, want, d.bag_views(k)):
            x = np.asarray(dv.feats, np.float32)
            np.testing.assert_array_equal(x[:, :a.dim], np.asarray(v.feats, np.float32))
            np.testing.assert_allclose(x[:, 2 * a.dim:], w, atol=2e-3, rtol=2e-3)
            if a.modality(k) == "CT":  # one series: its windows are not each other's partners
                np.testing.assert_array_equal(x[:, 2 * a.dim:], np.asarray(v.feats, np.float32))
            else:
                moved += int(np.abs(x[:, 2 * a.dim:] - np.asarray(v.feats, np.float32)).max() > 0.05)
    assert moved == 2  # both MR series read the other
    c.close()
    # only the cross-series part, from a folder that has the neighbourhood already: the same bytes
    nb, only = str(root / "nb"), str(root / "only")
    derive_context_store(plain, nb, 1, progress=False)
    assert cli_main(["add-context", nb, only, "--radius", "0", "--cross-series", "--cache", cache, "--quiet"]) == 0
    for v1, v2 in zip(FeatureStore(only).views, d.views):
        np.testing.assert_array_equal(np.asarray(v1.feats), np.asarray(v2.feats))
    # refusals, by name: no cache, twice, nothing asked
    assert cli_main(["add-context", plain, str(root / "mmonly"), "--cross-series-mm", "8", "--quiet"]) == 2
    assert not os.path.exists(root / "mmonly")  # a distance without --cross-series: refused, nothing written
    with pytest.raises(ContextError, match="--cache"):
        derive_context_store(plain, str(root / "nocache"), None, progress=False, cross_series_mm=16.0)
    with pytest.raises(ContextError, match="already holds cross-series"):
        derive_context_store(derived, str(root / "twice"), None, progress=False, cross_series_mm=16.0,
                             cache_dir=cache)
    with pytest.raises(ContextError, match="nothing to add"):
        derive_context_store(plain, str(root / "none"), None, progress=False)
    assert cli_main(["add-context", plain, str(root / "none2"), "--radius", "0", "--quiet"]) == 2


def _xs_head_folder(two_series, folder, cfg, seed, labels=("a", "b", "c")):
    """A copy of the fixture's model folder with a random MRI head of kind ``cfg`` fitted (as far as
    the folder knows) on the derived cross-series store's features."""
    import shutil

    from neurovfm.models.folder import update_config
    from neurovfm.probe.heads import build_head
    from neurovfm.probe.train import save_head

    root, _, model = two_series
    xs = FeatureStore(str(root / "xs"))
    shutil.copytree(model, folder, dirs_exist_ok=True)
    torch.manual_seed(seed)
    head = build_head(cfg, xs.dim, len(labels)).eval()
    save_head(folder, head, cfg, list(labels), name="head_mr", features=xs.head_features())
    update_config(folder, ood={})
    return folder, head


def test_analyze_rebuilds_the_cross_series_features_the_store_holds(two_series):
    """A head fitted on cross-series features gets, from `analyze` of the DICOM study, the features
    the derived store holds for it (a mean-pool head: its logits are a linear map of the mean
    input, so a wrong or missing part of the features changes them)."""

    from neurovfm.analyze.pipeline import Analyzer, read_study
    from neurovfm.probe.heads import HeadConfig

    root, _, _ = two_series
    xs = FeatureStore(str(root / "xs"))  # made by the test above
    folder, head = _xs_head_folder(two_series, str(root / "amodel"), HeadConfig(kind="mean"), seed=1)
    an = Analyzer(folder)
    group, _ = read_study(str(root / "dicom" / "mr"), an.cfg)
    assert len(group) == 2
    sc = an.score("MR", group)
    (k,) = [k for k in xs.studies() if xs.modality(k) == "MR"]
    bag = xs.bag(k)
    with torch.no_grad():
        logits, _ = head(torch.from_numpy(bag), torch.tensor([0, len(bag)]))
    np.testing.assert_allclose(sc.p_raw, torch.sigmoid(logits[0]).double().numpy(), atol=2e-3)


# -- maps fused across the study's series (map source token-fused, Plan Q) ------------------------
def test_fuse_series_maps_by_hand():
    from neurovfm.explain.fusion import fuse_series_maps

    a, b = np.array([[1.0], [3.0]]), np.array([[5.0]])
    ca, cb = np.array([[0.0, 0, 0], [32.0, 0, 0]]), np.array([[2.0, 0, 0]])
    fa, fb = fuse_series_maps([a, b], [ca, cb])
    # a's first token pairs with b's only token (2 mm); a's second is 30 mm away from it: its own value
    np.testing.assert_allclose(fa, [[0.5 * 1 + 0.5 * 5], [3.0]])
    np.testing.assert_allclose(fb, [[0.5 * 5 + 0.5 * 1]])  # b's token: nearest of a is a's first
    np.testing.assert_allclose(fuse_series_maps([a, b], [ca, cb], own=1.0)[0], a)
    np.testing.assert_allclose(fuse_series_maps([a, b], [ca, cb], own=0.0)[0], [[5.0], [3.0]])
    np.testing.assert_allclose(fuse_series_maps([a], [ca])[0], a)  # one series: unchanged
    with pytest.raises(ValueError, match="own weight"):
        fuse_series_maps([a], [ca], own=1.5)
    with pytest.raises(ValueError, match="centre arrays"):
        fuse_series_maps([a, b], [ca])


def test_token_fused_maps_and_the_map_a_model_folder_records(two_series, tmp_path):
    """token-fused = the token map fused across the study's two MR series (explain.fusion), renormalised
    over the study; a folder that records it (set-map) draws it by default in analyze (result.json says
    which map), an explicit --map-source wins, and bad choices are refused with the folder unchanged."""
    import shutil

    from neurovfm.analyze.config import AnalyzeConfig
    from neurovfm.analyze.pipeline import AnalyzeError, Analyzer, read_study, set_map_source
    from neurovfm.explain.fusion import fuse_series_maps
    from neurovfm.explain.maps import token_centres_ras
    from neurovfm.models.folder import read_config, update_config
    from neurovfm.probe.heads import HeadConfig, build_head
    from neurovfm.probe.train import save_head

    root, _, _ = two_series
    xs = FeatureStore(str(root / "xs"))  # made by the test above
    labels = ["a", "b", "c"]
    folder, _ = _xs_head_folder(two_series, str(tmp_path / "tmodel"), HeadConfig(kind="topk", top_k=2), seed=2)
    an = Analyzer(folder)
    group, _ = read_study(str(root / "dicom" / "mr"), an.cfg)
    tok = an.score("MR", group, map_source="token")
    fused = an.score("MR", group, map_source="token-fused", view_features=tok.view_features)
    assert (tok.map_source, fused.map_source) == ("token", "token-fused")
    want = fuse_series_maps(tok.per_series_w, [token_centres_ras(s.ts.grid_affine, s.ts.coords) for s in group])
    tot = sum(w.sum(0) for w in want)
    for got, w in zip(fused.per_series_w, want):
        np.testing.assert_allclose(got, w / tot, atol=1e-9)
    np.testing.assert_allclose(sum(w.sum(0) for w in fused.per_series_w), 1.0, atol=1e-9)
    assert not all(np.allclose(a, b) for a, b in zip(tok.per_series_w, fused.per_series_w))  # the series overlap
    np.testing.assert_allclose(fused.p_cal, tok.p_cal)  # the map changes, not the findings
    assert an.score("MR", group, view_features=tok.view_features).map_source == "head"  # nothing recorded
    # recorded in the folder: the default of analyze (and of pointing's "default"), unless told otherwise
    set_map_source(folder, "mr", "token-fused")
    assert read_config(folder)["heads"]["head_mr"]["map_source"] == "token-fused"
    an = Analyzer(folder)
    sc = an.score("MR", group, view_features=tok.view_features)
    assert sc.map_source == "token-fused"
    for a, b in zip(sc.per_series_w, fused.per_series_w):
        np.testing.assert_allclose(a, b)
    assert Analyzer(folder, AnalyzeConfig(map_source="head")).score("MR", group).map_source == "head"
    res = an.run(str(root / "dicom" / "mr"), str(tmp_path / "out"))
    assert [e["map_source"] for e in res["exams"]] == ["token-fused"]
    # refusals: an unknown map, a head that cannot draw it, a folder recording nonsense
    before = open(os.path.join(folder, "config.json")).read()
    with pytest.raises(AnalyzeError, match="'nonsense' is not a map"):
        set_map_source(folder, "MR", "nonsense")
    with pytest.raises(AnalyzeError, match="no head_ct"):
        set_map_source(folder, "CT", "head")
    mean = str(tmp_path / "mmodel")
    shutil.copytree(folder, mean)
    save_head(mean, build_head(HeadConfig(kind="mean"), xs.dim, len(labels)), HeadConfig(kind="mean"), labels,
              name="head_mr", features=xs.head_features())
    with pytest.raises(AnalyzeError, match="mean\\) has no token classifier"):
        set_map_source(mean, "MR", "token-fused")
    assert open(os.path.join(folder, "config.json")).read() == before
    # the command checks every choice before writing: a good MR choice beside a bad CT one writes nothing
    for bad in (["MR=token", "CT=head"], ["MR=token", "MR=head"], ["MR=token", "XX=head"]):
        assert cli_main(["set-map", folder, *bad]) == 2, bad
        assert open(os.path.join(folder, "config.json")).read() == before, bad
    assert cli_main(["set-map", folder, "MR=token"]) == 0
    assert read_config(folder)["heads"]["head_mr"]["map_source"] == "token"
    heads = read_config(folder)["heads"]
    heads["head_mr"]["map_source"] = "sideways"
    update_config(folder, heads=heads)
    with pytest.raises(AnalyzeError, match="records the map 'sideways'"):
        Analyzer(folder)
