"""`neurovfm embed`: frozen-encoder features of a real (phantom) cache — what was embedded equals
the encoder's output, shards and resumed runs give the same folder as one run, the folder names
its encoder and refuses to mix, and an incomplete folder is an error, not a silent subset."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch

from neurovfm.cli import main as cli_main
from neurovfm.models.folder import load_encoder
from neurovfm.models.packing import Packed
from neurovfm.probe.embed import EmbedConfig, FeatureStore, FeatureStoreError, embed
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.normalize import normalize

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_support import small_cache_with_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return small_cache_with_model(tmp_path_factory.mktemp("embed"))


def _all(fs: FeatureStore) -> dict:
    return {(v.series_key, v.view): np.asarray(v.feats) for v in fs.views}


def test_features_are_the_encoders_output(setup):
    root, cache, _, model = setup
    out = str(root / "one")
    res = embed(model, cache, out, EmbedConfig(tokens_per_batch=1500, part_tokens=2500), progress=False)
    assert res["complete"] and res["parts"] > 1
    fs = FeatureStore(out)
    c = TokenCache(cache)
    n_series = len(c.series())
    ct = sum(e.modality == "CT" for e in c.series())
    assert len(fs.views) == n_series + 2 * ct  # CT: three windows, MR: one view
    enc = load_encoder(model).eval()
    for v in fs.views[:4]:
        e = c.get(v.series_key)
        u8, coords, _ = c.views(e, [v.view] if v.modality == "CT" else None)
        x = normalize(np.asarray(u8[:, 0]), v.view if v.modality == "CT" else "mr")
        with torch.inference_mode():
            h = enc(Packed.cat([(x, torch.from_numpy(np.asarray(coords, np.int64)))]))
        np.testing.assert_allclose(np.asarray(v.feats, np.float32), h.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_array_equal(np.asarray(v.coords), np.asarray(coords))
    c.close()
    # a study's bag holds every token of every series view of the study
    s = fs.studies()[0]
    assert fs.bag(s).shape == (sum(len(v.feats) for v in fs.by_study[s]), fs.dim)


def test_shards_and_resume_match_one_run(setup):
    root, cache, _, model = setup
    cfg = EmbedConfig(tokens_per_batch=1500, part_tokens=2500)
    one = str(root / "ref")
    embed(model, cache, one, cfg, progress=False)
    two = str(root / "sharded")
    r0 = embed(model, cache, two, cfg, shard=(0, 2), progress=False)
    assert not r0["complete"]
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore(two)
    assert embed(model, cache, two, cfg, shard=(1, 2), progress=False)["complete"]
    shutil.rmtree(os.path.join(two, "parts", "p00001"))  # a lost part is redone on rerun
    embed(model, cache, two, cfg, progress=False)
    a, b = _all(FeatureStore(one)), _all(FeatureStore(two))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # batching does not change features (attention stays within a series)
    c = str(root / "bigbatch")
    embed(model, cache, c, EmbedConfig(tokens_per_batch=100000, part_tokens=2500), progress=False)
    for k, v in _all(FeatureStore(c)).items():
        np.testing.assert_allclose(v.astype(np.float32), a[k].astype(np.float32), atol=2e-3)


def test_refuses_another_encoder_and_splits_select(setup):
    root, cache, splits, model = setup
    out = str(root / "mix")
    embed(model, cache, out, EmbedConfig(part_tokens=100000), progress=False)
    other = str(root / "model2")
    assert cli_main(["init-model", other, "--like", model, "--seed", "1"]) == 0
    with pytest.raises(FeatureStoreError, match="encoder_id"):
        embed(other, cache, out, EmbedConfig(part_tokens=100000), progress=False)
    rc = cli_main(["embed", other, cache, out, "--quiet"])
    assert rc == 2  # a typed error, not a traceback
    sub = str(root / "test_only")
    embed(model, cache, sub, EmbedConfig(splits=["test"]), splits_csv=splits, progress=False)
    fs = FeatureStore(sub)
    import csv
    with open(splits) as fh:
        test = {r["study_key"] for r in csv.DictReader(fh) if r["split"] == "test"}
    assert set(fs.studies()) == test
    with pytest.raises(FeatureStoreError, match="not a feature folder"):
        FeatureStore(str(root))


def test_histogram_baseline_goes_through_the_same_store(setup):
    root, cache, _, _ = setup
    out = str(root / "hist")
    assert cli_main(["embed", "histogram:16", cache, out, "--quiet"]) == 0
    fs = FeatureStore(out)
    assert fs.dim == 16 * 4 and fs.meta["encoder_id"] == "histogram-16"
    c = TokenCache(cache)
    for v in fs.views[:5]:
        f = np.asarray(v.feats, np.float32)
        block = ["brain", "blood", "bone", "mr"].index(v.view if v.modality == "CT" else "mr")
        np.testing.assert_allclose(f[:, block * 16:(block + 1) * 16].sum(1), 1.0, atol=1e-2)
        assert np.abs(np.delete(f, np.s_[block * 16:(block + 1) * 16], axis=1)).max() == 0
        u8, _, _ = c.views(v.series_key, [v.view] if v.modality == "CT" else None)
        direct = np.bincount((np.asarray(u8[:, 0]).ravel().astype(int) * 16) >> 8, minlength=16) / u8[:, 0].size
        np.testing.assert_allclose(f[:, block * 16:(block + 1) * 16].mean(0), direct, atol=1e-3)
    c.close()


def test_random_init_model_is_the_pretraining_runs_initial_student(setup, tmp_path):
    """The random-init baseline is exactly where pretraining started (same architecture, seed)."""
    root, cache, splits, _ = setup
    from neurovfm.models.folder import save_encoder
    from neurovfm.pretrain.config import config_from_dict
    from neurovfm.pretrain.loop import Pretrainer

    d = {"model": {"size": "tiny", "encoder": {"width": 48, "depth": 2, "heads": 4},
                   "predictor": {"width": 48, "depth": 1, "heads": 4}},
         "data": {"cache": cache, "splits_csv": splits, "tokens_per_batch": 600},
         "run": {"out": str(tmp_path / "run"), "epochs": 1, "seed": 7, "tensorboard": False}}
    tr = Pretrainer(config_from_dict(d), progress=False)
    like = save_encoder(tr.model.student, str(tmp_path / "arch"))
    assert cli_main(["init-model", str(tmp_path / "rand"), "--like", like, "--seed", "7"]) == 0
    rand = load_encoder(str(tmp_path / "rand"))
    for k, v in tr.model.student.state_dict().items():
        assert torch.equal(rand.state_dict()[k], v), k
    assert cli_main(["init-model", str(tmp_path / "rand8"), "--like", like, "--seed", "8"]) == 0
    assert not torch.equal(load_encoder(str(tmp_path / "rand8")).state_dict()["token_embed.proj.weight"],
                           rand.state_dict()["token_embed.proj.weight"])
