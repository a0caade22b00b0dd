"""Feature readout from intermediate encoder blocks (`embed --layers`): the encoder's readout is
what a hand-written block loop gives, the feature folder names its blocks and refuses to mix,
heads saved from such features make `analyze` read the same blocks (and rollout go as deep),
and heads are never saved into, or run from, a folder whose encoder did not make the features."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from neurovfm.cli import main as cli_main
from neurovfm.models.attention import resolve_backend
from neurovfm.models.config import encoder_config
from neurovfm.models.encoder import Encoder, resolve_readout
from neurovfm.models.folder import read_config, update_config
from neurovfm.models.packing import Packed
from neurovfm.probe.embed import EmbedConfig, FeatureStore, FeatureStoreError, embed, encode_views, encoder_id

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_support import small_cache_with_model  # noqa: E402


def _packed(seed: int, lengths=(7, 12, 5), token_dim: int = 1024) -> Packed:
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        coords = torch.stack([torch.randint(0, 8, (n,), generator=g) for _ in range(3)], 1)
        items.append((torch.randn(n, token_dim, generator=g), coords))
    return Packed.cat(items)


def _by_hand(enc: Encoder, batch: Packed, layers: list[int]) -> torch.Tensor:
    """Embed, every block in order, the final norm of each wanted block's output, mean."""
    x = enc.token_embed(batch.tokens, batch.coords)
    outs = []
    for i, blk in enumerate(enc.blocks):
        x = blk(x, batch.cu, resolve_backend("auto", x.device), None, None)
        if i in layers:
            outs.append(enc.norm(x))
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("layers", [[0], [2], [1, 3], [0, 1, 2, 3]])
@pytest.mark.parametrize("pos_code", ["sincos_concat", "rope3d"])
def test_readout_matches_a_hand_written_block_loop(layers, pos_code):
    torch.manual_seed(0)
    enc = Encoder(encoder_config("tiny", width=48, depth=4, heads=2, pos_code=pos_code)).eval()
    batch = _packed(1)
    with torch.no_grad():
        got = enc(batch, readout_layers=layers)
        if pos_code == "sincos_concat":  # the hand loop has no rotary phases
            torch.testing.assert_close(got, _by_hand(enc, batch, layers), atol=1e-5, rtol=1e-5)
        # negative indices name the same blocks; the default is the last block exactly
        neg = [i - 4 for i in layers]
        assert torch.equal(enc(batch, readout_layers=neg), got)
        assert torch.equal(enc(batch, readout_layers=[-1]), enc(batch))
        if layers != [3]:
            assert not torch.allclose(got, enc(batch), atol=1e-3)


def test_readout_skips_blocks_it_does_not_need():
    torch.manual_seed(0)
    enc = Encoder(encoder_config("tiny", width=48, depth=4, heads=2)).eval()
    ran = []
    for i, blk in enumerate(enc.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    with torch.no_grad():
        enc(_packed(2), readout_layers=[1])
        assert ran == [0, 1]
        ran.clear()
        _, w = enc(_packed(2), attention_layers=[2], readout_layers=[0])  # attention still goes to block 2
        assert ran == [0, 1, 2] and len(w) == 1


@pytest.mark.parametrize("bad, match", [([4], "out of range"), ([-5], "out of range"), ([], "at least one"),
                                         ([1, -3], "named twice")])
def test_bad_readout_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_readout(bad, 4)


# -- feature folders, heads, analyze ----------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return small_cache_with_model(tmp_path_factory.mktemp("readout"))


def test_embed_layers_are_the_readout_and_named_in_the_folder(setup):
    root, cache, _, model = setup
    last, mid = str(root / "last"), str(root / "mid")
    embed(model, cache, last, EmbedConfig(part_tokens=100000), progress=False)
    assert cli_main(["embed", model, cache, mid, "--layers=5,-1", "--quiet"]) == 0
    a, b = FeatureStore(last), FeatureStore(mid)
    assert a.readout_layers is None and b.readout_layers == [5, 11]
    assert a.meta["encoder_id"] == b.meta["encoder_id"]
    from neurovfm.models.folder import load_encoder
    from neurovfm.tokens.cache import TokenCache
    from neurovfm.tokens.normalize import normalize

    enc = load_encoder(model).eval()
    c = TokenCache(cache)
    v = b.views[0]
    u8, coords, _ = c.views(c.get(v.series_key), [v.view] if v.modality == "CT" else None)
    c.close()
    x = normalize(np.asarray(u8[:, 0]), v.view if v.modality == "CT" else "mr")
    with torch.inference_mode():
        h = enc(Packed.cat([(x, torch.from_numpy(np.asarray(coords, np.int64)))]), readout_layers=[5, 11])
    np.testing.assert_allclose(np.asarray(v.feats, np.float32), h.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(np.asarray(a.views[0].feats, np.float32), np.asarray(v.feats, np.float32), atol=1e-2)
    # the same folder with other blocks is refused (the default and [-1] are the same features)
    with pytest.raises(FeatureStoreError, match="readout_layers"):
        embed(model, cache, mid, EmbedConfig(part_tokens=100000, layers=[-1]), progress=False)
    embed(model, cache, last, EmbedConfig(part_tokens=100000, layers=[-1]), progress=False)
    with pytest.raises(FeatureStoreError, match="out of range"):
        embed(model, cache, str(root / "bad"), EmbedConfig(layers=[12]), progress=False)
    assert cli_main(["embed", model, cache, str(root / "bad2"), "--layers=40", "--quiet"]) == 2
    with pytest.raises(FeatureStoreError, match="histogram"):
        embed("histogram:8", cache, str(root / "hist"), EmbedConfig(layers=[3]), progress=False)
    # encode_views (analyze's path) reads the same blocks
    got = encode_views(enc, [(np.asarray(u8[:, 0]), np.asarray(coords), v.view if v.modality == "CT" else "mr")],
                       readout=[5, 11])
    np.testing.assert_allclose(got[0], h.numpy(), atol=1e-5)


def test_appended_histograms_are_the_two_stores_side_by_side(setup):
    """``embed --append-histogram 8``: every token's features are the encoder's (as a plain embed)
    followed by its histogram (as ``histogram:8``), in one folder that names the bins and refuses
    to be resumed with other bins."""
    root, cache, _, model = setup
    plain, hist, both = str(root / "app_plain"), str(root / "app_hist"), str(root / "app_both")
    cfg = EmbedConfig(tokens_per_batch=1500, part_tokens=2500)
    embed(model, cache, plain, cfg, progress=False)
    embed("histogram:8", cache, hist, cfg, progress=False)
    assert cli_main(["embed", model, cache, both, "--append-histogram", "8", "--tokens-per-batch", "1500",
                     "--part-tokens", "2500", "--quiet"]) == 0
    a, h, b = FeatureStore(plain), FeatureStore(hist), FeatureStore(both)
    assert b.dim == a.dim + h.dim and b.histogram_bins == 8 and a.histogram_bins is None
    assert b.head_features() == {"encoder_id": a.meta["encoder_id"], "readout_layers": None, "histogram_bins": 8}
    assert [(v.series_key, v.view) for v in b.views] == [(v.series_key, v.view) for v in a.views]
    for va, vh, vb in zip(a.views, h.views, b.views):
        np.testing.assert_array_equal(np.asarray(vb.feats)[:, :a.dim], np.asarray(va.feats))
        np.testing.assert_array_equal(np.asarray(vb.feats)[:, a.dim:], np.asarray(vh.feats))
    with pytest.raises(FeatureStoreError, match="histogram_bins"):
        embed(model, cache, both, EmbedConfig(tokens_per_batch=1500, part_tokens=2500, append_histogram=16),
              progress=False)
    with pytest.raises(FeatureStoreError, match="histograms already"):
        embed("histogram:8", cache, str(root / "app_bad"), EmbedConfig(append_histogram=8), progress=False)
    assert cli_main(["embed", model, cache, str(root / "app_bad2"), "--append-histogram", "1", "--quiet"]) == 2


def test_heads_are_saved_only_beside_the_encoder_that_made_the_features(setup):
    from neurovfm.eval.experiment import EvaluationError, check_model_for_features

    root, cache, _, model = setup
    feats = str(root / "chk")
    embed(model, cache, feats, EmbedConfig(part_tokens=100000, layers=[3]), progress=False)
    store = FeatureStore(feats)
    check_model_for_features(model, store, "a")  # its own encoder: fine
    other = str(root / "other_model")
    assert cli_main(["init-model", other, "--like", model, "--seed", "1"]) == 0
    with pytest.raises(EvaluationError, match="did not make"):
        check_model_for_features(other, store, "a")
    with pytest.raises(EvaluationError, match="no encoder"):
        check_model_for_features(str(root / "empty"), store, "a")
    hist = str(root / "hist_ok")
    embed("histogram:8", cache, hist, EmbedConfig(), progress=False)
    with pytest.raises(EvaluationError, match="did not make"):
        check_model_for_features(model, FeatureStore(hist), "hist")


def test_analyze_reads_the_heads_blocks_and_refuses_another_encoders_heads(tmp_path):
    from analyze_support import head_volume, make_model, write_nifti_study

    from neurovfm.analyze.pipeline import AnalyzeError, Analyzer, read_study
    from neurovfm.explain.rollout import rollout_matrix

    folder = make_model(str(tmp_path / "m"), depth=3)
    vol, aff = head_volume(shape=(80, 96, 64), spacing=(2.0, 2.0, 2.5), modality="MR", seed=2)
    study = write_nifti_study(str(tmp_path / "study"), vol, aff, "MR", name="T1w")
    an = Analyzer(folder)
    group, _ = read_study(study, an.cfg)
    base = an.score("MR", group)
    heads = read_config(folder)["heads"]
    heads["head_mr"]["features"] = {"encoder_id": encoder_id(folder), "readout_layers": [0, 1]}
    update_config(folder, heads=heads)
    an2 = Analyzer(folder)
    mid = an2.score("MR", group)
    views = [(np.asarray(v[0]), np.asarray(v[1]), "mr") for v in _views(group)]
    want = encode_views(an2.encoder, views, readout=[0, 1])
    for a, b in zip(mid.view_features, want):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(mid.view_features[0], base.view_features[0], atol=1e-3)
    assert not np.allclose(mid.p_cal, base.p_cal)
    # rollout for features read at blocks 0 and 1: the mean of the one- and two-layer rollouts
    u8, coords, view = views[0]
    one = rollout_matrix(an2.encoder, u8, coords, view, readout=[0])
    two = rollout_matrix(an2.encoder, u8, coords, view, readout=[1])
    both = rollout_matrix(an2.encoder, u8, coords, view, readout=[0, 1])
    np.testing.assert_allclose(both, (one + two) / 2, atol=1e-12)
    np.testing.assert_allclose(both.sum(1), 1.0, atol=1e-9)
    assert not np.allclose(one, rollout_matrix(an2.encoder, u8, coords, view), atol=1e-6)
    # a head fitted on features with appended histograms gets the same: encoder features + histograms
    from neurovfm.probe.embed import HistogramFeaturizer
    from neurovfm.probe.heads import HeadConfig, build_head
    from neurovfm.probe.train import save_head

    dim = want[0].shape[1]
    torch.manual_seed(0)
    wide = build_head(HeadConfig(kind="mean"), dim + 4 * 8, len(heads["head_mr"]["labels"])).eval()
    save_head(folder, wide, HeadConfig(kind="mean"), heads["head_mr"]["labels"], name="head_mr",
              features={"encoder_id": encoder_id(folder), "readout_layers": None, "histogram_bins": 8})
    with pytest.raises(AnalyzeError, match="distance-to-training model reads 48-wide features but head_mr reads 80"):
        Analyzer(folder)  # the old distance model was fitted on the encoder's features alone
    update_config(folder, ood={k: v for k, v in read_config(folder).get("ood", {}).items() if k != "MR"})
    an3 = Analyzer(folder)
    got = an3.score("MR", group)
    bag = np.concatenate([np.concatenate([f, HistogramFeaturizer(8)(u8, "mr")], 1)
                          for f, (u8, _, _) in zip(base.view_features, views)])
    with torch.no_grad():
        logits, _ = wide(torch.from_numpy(bag.astype(np.float32)), torch.tensor([0, len(bag)]))
    np.testing.assert_allclose(got.p_raw, torch.sigmoid(logits[0]).double().numpy(), atol=1e-6)
    for a, b in zip(got.view_features, base.view_features):  # the report's input stays the encoder's
        np.testing.assert_allclose(a, b, atol=1e-6)
    heads = read_config(folder)["heads"]
    # heads fitted on another encoder's features: refused at load, naming both encoders
    heads["head_mr"]["features"]["encoder_id"] = "0" * 64
    update_config(folder, heads=heads)
    with pytest.raises(AnalyzeError, match="head_mr was fitted on features of encoder 000000000000"):
        Analyzer(folder)


def _views(group):
    from neurovfm.ingest.policy import DEFAULT_POLICY
    from neurovfm.tokens.cache import as_views

    for s in group:
        u8, _ = as_views(s.ts.tokens, s.ts.storage, s.ts.views, DEFAULT_POLICY)
        yield u8[:, 0], s.ts.coords


def test_external_evaluation_refuses_features_of_other_blocks(setup, tmp_path):
    import shutil

    from neurovfm.eval.external import ExternalConfig, ExternalEvalError, _check_features

    root, cache, _, model = setup
    folder = str(tmp_path / "m")
    shutil.copytree(model, folder)
    feats = str(root / "ext_last")
    embed(folder, cache, feats, EmbedConfig(part_tokens=100000), progress=False)
    store = FeatureStore(feats)
    update_config(folder, heads={"head_ct": {"features": {"encoder_id": encoder_id(folder), "readout_layers": None}}})
    _check_features(folder, store, ExternalConfig())  # the blocks the head was fitted on: fine
    update_config(folder, heads={"head_ct": {"features": {"encoder_id": encoder_id(folder), "readout_layers": [3]}}})
    with pytest.raises(ExternalEvalError, match="encoder blocks the last, but .* fitted on \\[3\\]"):
        _check_features(folder, store, ExternalConfig())
    update_config(folder, heads={"head_ct": {"features": {"encoder_id": encoder_id(folder), "readout_layers": None,
                                                          "histogram_bins": 8}}})
    with pytest.raises(ExternalEvalError, match="appended histogram bins none, but .* fitted on 8"):
        _check_features(folder, store, ExternalConfig())
    update_config(folder, heads={"head_ct": {"features": {"encoder_id": encoder_id(folder), "readout_layers": None,
                                                          "context_radius": 1}}})  # embed --append-context 1
    with pytest.raises(ExternalEvalError, match="a neighbourhood radius none, but .* fitted on 1"):
        _check_features(folder, store, ExternalConfig())
    update_config(folder, heads={"head_ct": {"features": {"encoder_id": encoder_id(folder), "readout_layers": None,
                                                          "cross_series_mm": 16.0}}})  # add-context --cross-series
    with pytest.raises(ExternalEvalError, match="a cross-series distance \\(mm\\) none, but .* fitted on 16.0"):
        _check_features(folder, store, ExternalConfig())
    # only the heads of the modalities scored are checked: an MR-only run is not refused for the CT head
    _check_features(folder, store, ExternalConfig(modalities=["MR"]))
    with pytest.raises(ExternalEvalError, match="head_ct"):
        _check_features(folder, store, ExternalConfig(modalities=["CT"]))


def test_feature_rank_bench_uses_the_splits_tokens(setup):
    """bench/eval/feature_rank.py: with a budget above the split's token count, each modality's
    rank is the monitor's effective rank of exactly that split's tokens; histograms are skipped."""
    import csv
    import importlib.util

    from neurovfm.pretrain.monitors import effective_rank

    root, cache, splits, model = setup
    feats = str(root / "rank_feats")
    embed(model, cache, feats, EmbedConfig(part_tokens=100000), progress=False)
    hist = str(root / "rank_hist")
    embed("histogram:8", cache, hist, EmbedConfig(), progress=False)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "eval",
                          "feature_rank.py")
    spec = importlib.util.spec_from_file_location("feature_rank", script)
    fr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fr)
    res = fr.ranks({"a": feats, "h": hist}, splits, split="train", tokens=10**7)
    assert set(res) == {"a"}
    store = FeatureStore(feats)
    with open(splits) as fh:
        train = {r["study_key"] for r in csv.DictReader(fh) if r["split"] == "train"}
    for mod in ("CT", "MR"):
        x = np.concatenate([store.bag(s) for s in store.studies() if s in train and store.modality(s) == mod])
        assert res["a"][mod] == pytest.approx(effective_rank(torch.from_numpy(x), max_tokens=len(x)), rel=1e-6)
