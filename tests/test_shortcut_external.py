"""The shortcut check (CT vs MR separability by token kind; head attention on air/bone tokens) and
the external-site evaluation (a saved model on another `--site`, nothing refitted but the
calibration, and that only on the other site's validation split)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

from neurovfm.cli import main as cli_main
from neurovfm.eval import calibrate as cal
from neurovfm.eval.data import read_study_table
from neurovfm.eval.external import ExternalConfig, ExternalEvalError, evaluate_external
from neurovfm.errors import NeuroVFMError
from neurovfm.eval.shortcut import LogisticProbe, ShortcutConfig, shortcut_check, study_means
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.models.folder import read_config, update_config
from neurovfm.pretrain.data import KIND_AIR, KIND_BONE, KIND_SOFT
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import EmbedConfig, FeatureStore, embed
from neurovfm.probe.train import load_head, predict
from neurovfm.synth.archive import write_archive
from neurovfm.synth.rekey import rekey_archive

# (studies, seed), chosen for a small archive: home has >= 3 train, 1 val and 1 test study per
# modality (what `evaluate --save-model` needs); the other site has no train studies, 2 CT and no
# MR validation studies (recalibration fitted on CT, none possible on MR), 2 test studies of each
HOME = (10, 15)
EXTERNAL = (6, 795)


# -- the shortcut check on a store with a planted background signal ---------------------------------
class PlantedStore:
    """FeatureStore-like: soft-tissue tokens are the same noise for CT and MR; air/bone tokens
    carry the modality (+signal on feature 0 for MR). Study 0 has no air/bone token at all."""

    def __init__(self, n: int = 48, dim: int = 6, signal: float = 3.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.mods, self.feats, self.kinds = {}, {}, {}
        for i in range(n):
            k = f"study{i:03d}"
            mod = "CT" if i % 2 == 0 else "MR"
            kinds = rng.choice([KIND_SOFT, KIND_AIR, KIND_BONE], size=40, p=[0.6, 0.25, 0.15]).astype(np.int8)
            kinds[:2] = (KIND_SOFT, KIND_AIR)
            if i == 0:
                kinds[:] = KIND_SOFT
            x = rng.normal(size=(40, dim)).astype(np.float32)
            x[kinds != KIND_SOFT, 0] += signal * (mod == "MR")
            self.mods[k], self.feats[k], self.kinds[k] = mod, x, kinds

    def studies(self):
        return sorted(self.feats)

    def modality(self, k):
        return self.mods[k]

    def bag(self, k, views=None, dtype=np.float32):
        return self.feats[k].astype(dtype)

    def bag_kinds(self, k, views=None):
        return self.kinds[k]


def _planted_labels(path, store: PlantedStore) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_key", "patient_key", "split", "modality"])
        for i, k in enumerate(store.studies()):
            w.writerow([k, f"patient{i}", "train" if i < 24 else "val" if i < 32 else "test", store.modality(k)])
    return str(path)


def test_logistic_probe_reaches_the_optimum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(float)
    p = LogisticProbe(l2=0.1).fit(x, y)
    z = (x - p.mean) / p.scale
    X = np.hstack([z, np.ones((60, 1))])
    q = 1 / (1 + np.exp(-X @ p.w))
    grad = X.T @ (q - y) / 60 + 0.1 * np.r_[p.w[:-1], 0.0]
    assert np.abs(grad).max() < 1e-8
    np.testing.assert_array_equal(p.w, LogisticProbe(l2=0.1).fit(x, y).w)  # deterministic


def test_probe_standardisation_is_unit_spread_and_leaves_constant_columns_finite():
    from neurovfm.eval.standardize import fit_standardization, standardize
    rng = np.random.default_rng(4)
    x = np.c_[rng.normal(3.0, 5.0, 200), np.full(200, 7.0), rng.normal(-1.0, 0.01, 200)]
    mean, scale = fit_standardization(x)
    z = standardize(x, mean, scale)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, [0, 2]].std(0), 1.0, rtol=1e-12)
    assert scale[1] == 1.0 and np.all(z[:, 1] == 0.0)  # a constant column is centred, not divided by ~0
    p = LogisticProbe(l2=0.1).fit(x, (x[:, 0] > 3).astype(float))  # the shortcut probe uses the same statistics
    np.testing.assert_array_equal(p.mean, mean)
    np.testing.assert_array_equal(p.scale, scale)


def test_shortcut_probe_by_token_kind(tmp_path):
    store = PlantedStore()
    labels = _planted_labels(tmp_path / "labels.csv", store)
    cfg = ShortcutConfig(bootstrap=200)
    s = shortcut_check({"planted": store}, labels, str(tmp_path / "out"), cfg)
    pr = s["probes"]["planted"]
    assert pr["nonbrain"]["auroc"] >= 0.95  # the background gives the modality away
    assert pr["all"]["auroc"] >= 0.9
    assert pr["soft"]["auroc"] < 0.8  # soft tissue carries none of it here
    assert pr["nonbrain"]["dropped_without_tokens"] == 1 and pr["soft"]["dropped_without_tokens"] == 0
    for sub in ("soft", "nonbrain", "all"):
        r = pr[sub]
        assert 0 <= r["low"] <= r["auroc"] <= r["high"] <= 1
        assert r["n_test"] == 16
    # the soft-tissue study means are exactly the means over the soft tokens ...
    keys = store.studies()
    means, share = study_means(store, keys)
    for i, k in enumerate(keys):
        soft = store.kinds[k] == KIND_SOFT
        np.testing.assert_allclose(means["soft"][i], store.feats[k][soft].astype(np.float64).mean(0))
        assert share["nonbrain"][i] == pytest.approx((~soft).mean())
    # ... and the probe on them is the one computed directly
    y = np.array([store.modality(k) == "MR" for k in keys], float)
    tr = np.arange(24)
    te = np.array([keys.index(k) for k in pr["soft"]["test_study_keys"]])
    assert sorted(te) == list(range(32, 48))
    direct = np.stack([store.feats[k][store.kinds[k] == KIND_SOFT].astype(np.float64).mean(0) for k in keys])
    ref = LogisticProbe(pr["soft"]["l2"]).fit(direct[tr], y[tr]).decision(direct[te])
    np.testing.assert_allclose(pr["soft"]["test_scores"], ref, rtol=1e-7, atol=1e-9)
    # removing the signal from the air/bone tokens leaves probe (i) untouched: they were dropped
    s0 = shortcut_check({"planted": PlantedStore(signal=0.0)}, labels, None, cfg)
    np.testing.assert_array_equal(s0["probes"]["planted"]["soft"]["test_scores"], pr["soft"]["test_scores"])
    assert s0["probes"]["planted"]["nonbrain"]["auroc"] < 0.8
    for f in ("shortcut.json", "shortcut.csv", "shortcut.png"):
        assert os.path.getsize(tmp_path / "out" / f) > 100


# -- a home site and another site, one encoder ---------------------------------------------------------
@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    t0 = time.time()
    model = str(root / "model")
    assert cli_main(["init-model", model, "--size", "tiny", "--seed", "0"]) == 0
    out = {"root": root, "model": model}
    for name, (n, seed), site in (("home", HOME, "main"), ("ext", EXTERNAL, "other")):
        arch = str(root / f"{name}_archive")
        write_archive(arch, n, seed, site=site, workers=2, progress=False)
        keyer = Keyer(f"{name}-secret".encode())
        cache = str(root / f"{name}_cache")
        run_ingest(os.path.join(arch, "dicom"), cache, IngestOptions(progress=False, workers=2), keyer=keyer)
        out[f"{name}_labels"], _ = rekey_archive(arch, str(root / f"{name}_keyed"), keyer)
        out[f"{name}_feats"] = str(root / f"{name}_feats")
        embed(model, cache, out[f"{name}_feats"], EmbedConfig(), progress=False)
    out["eval"] = str(root / "eval")
    assert cli_main(["evaluate", "--features", f"a={out['home_feats']}", "--labels", out["home_labels"],
                     "--out", out["eval"], "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "3",
                     "--save-model", model, "--quiet"]) == 0
    out["setup_s"] = time.time() - t0
    return out


def _digest(folder: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def test_external_applies_the_saved_model_unchanged(sites, capsys):
    model, out = sites["model"], str(sites["root"] / "external")
    before = _digest(model)
    rc = cli_main(["evaluate-external", "--model", model, "--features", sites["ext_feats"],
                   "--labels", sites["ext_labels"], "--out", out, "--min-test-positives", "1",
                   "--bootstrap", "100", "--home-metrics", os.path.join(sites["eval"], "metrics.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ECE, recalibrated on external val" in printed and "macro AUROC" in printed
    assert _digest(model) == before  # nothing written into the model folder
    with open(os.path.join(out, "external.json")) as fh:
        s = json.load(fh)
    assert set(s["modalities"]) == {"CT", "MR"}
    store = FeatureStore(sites["ext_feats"])
    recalibrated = 0
    for mod, e in s["modalities"].items():
        head, meta = load_head(model, f"head_{mod.lower()}")
        p = np.load(os.path.join(out, f"predictions_{mod.lower()}.npz"))
        keys = [str(k) for k in p["study_keys"]]
        t = read_study_table(sites["ext_labels"], mod, meta["labels"], set(store.studies()))
        assert sorted(keys) == sorted(t.study_keys[i] for i in t.index("test"))
        # the saved head's own predictions on the external bags: no refit
        logits, _ = predict(head, [store.bag(k) for k in keys])
        np.testing.assert_allclose(p["logits"], logits, rtol=1e-6, atol=1e-6)
        home = cal.scaler_from_dict(meta["calibration"])
        np.testing.assert_allclose(p["probs_home_calibration"], home.transform(logits), rtol=1e-9)
        assert e["calibration_home"] == meta["calibration"]
        thr = np.array([meta["thresholds"][lab] for lab in meta["labels"]])
        np.testing.assert_array_equal(p["thresholds"], thr)
        # the recalibration is the stored kind fitted on the external validation logits
        va = t.index("val")
        ref = type(home)().fit(predict(head, [store.bag(t.study_keys[i]) for i in va])[0], t.y[va]) \
            if len(va) else home
        if not len(va):
            assert e["recalibrated_labels"] == [] and e["calibration_recalibrated"] == meta["calibration"]
        got = cal.scaler_from_dict(e["calibration_recalibrated"])
        assert e["calibration_recalibrated"]["kind"] == meta["calibration"]["kind"]
        for j, lab in enumerate(meta["labels"]):
            refit = lab in e["recalibrated_labels"]
            recalibrated += refit
            src = ref if refit else home
            for attr in ("a", "b") if isinstance(home, cal.PlattScaler) else ("t",):
                assert getattr(got, attr)[j] == pytest.approx(getattr(src, attr)[j], rel=1e-9, abs=1e-12)
        by_label = {r["label"]: r for r in csv.DictReader(open(os.path.join(out, "external.csv")))
                    if r["modality"] == mod}
        y = p["y"]
        for j, lab in enumerate(meta["labels"]):
            r = by_label[lab]
            if r.get("auroc"):
                assert 0 <= float(r["auroc"]) <= 1
                assert 0 <= float(r["ece_home_calibration"]) <= 1 and 0 <= float(r["ece_recalibrated"]) <= 1
                m = ~np.isnan(y[:, j])
                flag = float((p["probs_home_calibration"][m, j] >= thr[j]).mean())
                assert float(r["op_flag_rate"]) == pytest.approx(flag)
        if e["headline_labels"]:
            ci = e["macro_auroc"]
            assert 0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1
        assert "home" in e and e["home"]["headline_labels"] is not None
    assert recalibrated > 0  # the external validation split had both classes for some label
    assert os.path.getsize(os.path.join(out, "reliability_external.png")) > 1000


def _flipped(src: str, dst: str, split: str) -> str:
    with open(src, newline="") as fh:
        r = csv.DictReader(fh)
        cols, rows = r.fieldnames, list(r)
    fixed = {"study_key", "patient_key", "split", "modality", "site", "sex", "age", "triage"}
    for row in rows:
        if row["split"] == split:
            for c in cols:
                if c not in fixed and row[c] in ("0", "1"):
                    row[c] = "1" if row[c] == "0" else "0"
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return dst


def test_recalibration_sees_only_the_external_validation_split(sites, tmp_path):
    cfg = ExternalConfig(min_test_positives=1, bootstrap=100)
    a = evaluate_external(sites["model"], sites["ext_feats"], sites["ext_labels"], str(tmp_path / "a"), cfg)
    b = evaluate_external(sites["model"], sites["ext_feats"], _flipped(sites["ext_labels"], str(tmp_path / "t.csv"),
                          "test"), str(tmp_path / "b"), cfg)
    c = evaluate_external(sites["model"], sites["ext_feats"], _flipped(sites["ext_labels"], str(tmp_path / "v.csv"),
                          "val"), str(tmp_path / "c"), cfg)
    changed_by_val, scored_any = False, False
    for mod in a["modalities"]:
        ea, eb, ec = a["modalities"][mod], b["modalities"][mod], c["modalities"][mod]
        assert ea["calibration_recalibrated"] == eb["calibration_recalibrated"]  # test labels never used
        pa = np.load(tmp_path / "a" / f"predictions_{mod.lower()}.npz")
        pb = np.load(tmp_path / "b" / f"predictions_{mod.lower()}.npz")
        np.testing.assert_array_equal(pa["probs_recalibrated"], pb["probs_recalibrated"])
        np.testing.assert_array_equal(pa["logits"], pb["logits"])
        # ... while the test labels did flip: every scored AUROC a -> 1 - a
        rows_a = {r["label"]: r for r in csv.DictReader(open(tmp_path / "a" / "external.csv")) if r["modality"] == mod}
        rows_b = {r["label"]: r for r in csv.DictReader(open(tmp_path / "b" / "external.csv")) if r["modality"] == mod}
        scored = [lab for lab, r in rows_a.items() if r.get("auroc")]
        scored_any |= bool(scored)
        for lab in scored:
            assert float(rows_b[lab]["auroc"]) == pytest.approx(1 - float(rows_a[lab]["auroc"]), abs=1e-9)
        changed_by_val |= ea["calibration_recalibrated"] != ec["calibration_recalibrated"]
        assert ea["calibration_home"] == ec["calibration_home"]
    assert scored_any
    assert changed_by_val  # and the validation labels are what it is fitted on


def test_external_refuses_features_of_another_encoder(sites, tmp_path):
    other = str(tmp_path / "other_model")
    assert cli_main(["init-model", other, "--size", "tiny", "--seed", "5"]) == 0
    for f in ("head_ct.safetensors", "head_mr.safetensors"):
        shutil.copy(os.path.join(sites["model"], f), os.path.join(other, f))
    update_config(other, heads=read_config(sites["model"])["heads"])
    args = ["evaluate-external", "--model", other, "--features", sites["ext_feats"], "--labels", sites["ext_labels"],
            "--out", str(tmp_path / "o"), "--min-test-positives", "1", "--bootstrap", "100"]
    assert cli_main(args) == 2
    with pytest.raises(ExternalEvalError, match="encoder"):
        evaluate_external(other, sites["ext_feats"], sites["ext_labels"], str(tmp_path / "o2"),
                          ExternalConfig(bootstrap=100))
    assert cli_main(args + ["--no-encoder-check"]) == 0
    assert cli_main(["evaluate-external", "--model", str(tmp_path / "nope"), "--features", sites["ext_feats"],
                     "--labels", sites["ext_labels"], "--out", str(tmp_path / "o3")]) == 2


def test_shortcut_cli_on_real_features(sites, tmp_path):
    out = str(tmp_path / "shortcut")
    metrics = os.path.join(sites["eval"], "metrics.json")
    rc = cli_main(["shortcut", "--features", f"a={sites['home_feats']}", "--labels", sites["home_labels"],
                   "--out", out, "--eval-metrics", metrics, "--bootstrap", "100"])
    assert rc == 0
    with open(os.path.join(out, "shortcut.json")) as fh:
        s = json.load(fh)
    store = FeatureStore(sites["home_feats"])
    for sub in ("soft", "nonbrain", "all"):
        r = s["probes"]["a"][sub]
        assert r["auroc"] is None or 0 <= r["auroc"] <= 1
    # the tokens cached for these MRI studies are all soft tissue: probe (ii) cannot be fitted, and says why
    nb = s["probes"]["a"]["nonbrain"]
    mr_without = sum(store.modality(k) == "MR" and not (store.bag_kinds(k) != KIND_SOFT).any()
                     for k in store.studies())
    assert nb["dropped_by_modality"]["MR"] == mr_without
    if mr_without == sum(store.modality(k) == "MR" for k in store.studies()):
        assert nb["auroc"] is None and "MR" in nb["note"]
    assert s["probes"]["a"]["soft"]["auroc"] is not None and s["probes"]["a"]["all"]["auroc"] is not None
    # the study means of soft tokens are the soft tokens' means, read straight from the store
    keys = sorted(store.studies())[:3]
    means, _ = study_means(store, keys)
    for i, k in enumerate(keys):
        soft = store.bag_kinds(k) == KIND_SOFT
        np.testing.assert_allclose(means["soft"][i], store.bag(k)[soft].astype(np.float64).mean(0), rtol=1e-6)
    # attention rows are the evaluation's numbers, next to the token share of the test studies
    with open(metrics) as fh:
        ev = json.load(fh)
    att = {(r["model"], r["modality"]): r for r in s["attention"]}
    assert set(att) == {("a", "CT"), ("a", "MR")}
    for mod in ("CT", "MR"):
        t = read_study_table(sites["home_labels"], mod, [], set(store.studies()))
        share = np.mean([(store.bag_kinds(t.study_keys[i]) != KIND_SOFT).mean() for i in t.index("test")])
        r = att[("a", mod)]
        assert r["attention_on_nonbrain_tokens"] == ev["models"]["a"][mod]["attention_on_nonbrain_tokens"]
        assert r["nonbrain_token_share"] == pytest.approx(share)
        if share > 0:
            assert r["ratio"] == pytest.approx(r["attention_on_nonbrain_tokens"] / share)
        else:  # no air/bone token to attend to: no ratio, and no attention there
            assert r["ratio"] is None and r["attention_on_nonbrain_tokens"] == 0
    rows = list(csv.DictReader(open(os.path.join(out, "shortcut.csv"))))
    assert {r["section"] for r in rows} == {"probe", "token_share", "attention"}
    assert os.path.getsize(os.path.join(out, "shortcut.png")) > 1000
    assert cli_main(["shortcut", "--features", f"a={sites['home_feats']}", "--labels", sites["home_labels"],
                     "--out", out, "--eval-metrics", str(tmp_path / "missing.json")]) == 2


# -- the anatomy probe on the home archive's real per-subject anatomy maps ------------------------------
def _overwrite_features(src: str, dst: str, make) -> str:
    """A copy of feature folder ``src`` whose token features are ``make(view) -> [n, dim]``."""
    shutil.copytree(src, dst)
    store = FeatureStore(src)
    for i in range(store.meta["n_parts"]):
        d = os.path.join(dst, "parts", f"p{i:05d}")
        rows = json.load(open(os.path.join(d, "index.json")))
        n = sum(r["n_tokens"] for r in rows)
        f = np.memmap(os.path.join(d, "feats.f16"), np.float16, "r+", shape=(n, store.dim))
        for r in rows:
            v = next(v for v in store.views if v.series_key == r["series_key"] and v.view == r["view"])
            f[r["offset"]:r["offset"] + r["n_tokens"]] = make(v)
        f.flush()
    return dst


def test_anatomy_probe_finds_planted_anatomy_not_noise(sites, tmp_path):
    import nibabel as nib

    from neurovfm.eval.anatomy import AnatomyProbeConfig, anatomy_probe, class_lookup, read_truth, token_codes
    from neurovfm.synth.atlas_maps import read_legend
    from neurovfm.tokens.cache import TokenCache

    root = sites["root"]
    arch, cache_dir = str(root / "home_archive"), str(root / "home_cache")
    keyer = Keyer(b"home-secret")
    truth, classes = read_truth(arch, keyer)
    lookup = class_lookup(read_legend(os.path.join(arch, "tables", "anatomy_labels.csv")), classes)
    cache = TokenCache(cache_dir)
    rng = np.random.default_rng(0)

    def planted(v):  # the token's true class, one-hot, under noise (a few hundred train tokens, 192 dims)
        _, code = token_codes(cache.get(v.series_key).grid_affine_array, v.coords, nib.load(truth[v.study_key].anatomy))
        cls = np.where(code > 0, lookup[np.clip(code, 0, len(lookup) - 1)], -1)
        x = rng.normal(0, 0.3, (len(cls), FeatureStore(sites["home_feats"]).dim))
        x[cls >= 0, cls[cls >= 0]] += 3.0
        return x

    good = _overwrite_features(sites["home_feats"], str(tmp_path / "planted"), planted)
    noise = _overwrite_features(sites["home_feats"], str(tmp_path / "noise"),
                                lambda v: rng.normal(0, 1, (len(v.coords), FeatureStore(sites["home_feats"]).dim)))
    cache.close()
    cfg = AnatomyProbeConfig(tokens_per_view=200, min_train_tokens=10, bootstrap=200, l2_grid=[1e-2])
    out = tmp_path / "anatomy"
    s = anatomy_probe({"planted": good, "noise": noise, "random": sites["home_feats"]}, arch, cache_dir,
                      str(out), cfg, keyer=keyer)
    assert s["modalities"], "no modality probed"
    for mod, m in s["modalities"].items():
        r = m["results"]
        assert set(r) == {"position", "planted", "noise", "random"}
        assert r["planted"]["balanced_accuracy"]["estimate"] > 0.9, (mod, r["planted"])
        assert r["noise"]["balanced_accuracy"]["estimate"] < m["chance_balanced_accuracy"] + 0.2, (mod, r["noise"])
        assert r["noise"]["planted_minus_this_balanced_accuracy"]["low"] > 0.3
        assert m["tokens"]["test"] > 50
    for f in ("anatomy.json", "anatomy.csv", "anatomy.png"):
        assert os.path.getsize(out / f) > 100
    # the features must come from the cache the maps are looked up through, under its site secret
    with pytest.raises(NeuroVFMError, match="not in the cache"):
        anatomy_probe({"planted": good}, arch, str(root / "ext_cache"), None, cfg, keyer=keyer)
    with pytest.raises(NeuroVFMError, match="site secret"):
        anatomy_probe({"planted": good}, arch, cache_dir, None, cfg, keyer=Keyer(b"another-secret"))


# -- the lesion probe on the home archive's lesion masks -------------------------------------------------
def test_lesion_probe_finds_planted_lesion_tokens_not_noise(sites, tmp_path):
    """Features with a lesion flag planted in one dimension: token AUROC ~1 and the top token of
    every test study with a big finding in a lesion; pure noise: AUROC near 0.5 and far below."""
    import nibabel as nib

    from neurovfm.eval.anatomy import token_codes
    from neurovfm.eval.lesion_probe import LesionProbeConfig, lesion_probe, read_lesion_truth
    from neurovfm.tokens.cache import TokenCache

    root = sites["root"]
    arch, cache_dir = str(root / "home_archive"), str(root / "home_cache")
    keyer = Keyer(b"home-secret")
    truth = read_lesion_truth(arch, keyer, 10.0)
    cache = TokenCache(cache_dir)
    dim = FeatureStore(sites["home_feats"]).dim
    rng = np.random.default_rng(0)

    def planted(v):
        _, code = token_codes(cache.get(v.series_key).grid_affine_array, v.coords, nib.load(truth[v.series_key].mask))
        x = rng.normal(0, 0.3, (len(code), dim))
        x[code > 0, 0] += 3.0
        return x

    good = _overwrite_features(sites["home_feats"], str(tmp_path / "planted"), planted)
    noise = _overwrite_features(sites["home_feats"], str(tmp_path / "noise"), lambda v: rng.normal(0, 1, (len(v.coords), dim)))
    cache.close()
    cfg = LesionProbeConfig(negatives_per_series=40, bootstrap=200, l2_grid=[1e-1], min_size_mm=0.0)
    s = lesion_probe({"planted": good, "noise": noise}, arch, cache_dir, str(tmp_path / "out"), cfg, keyer=keyer)
    assert s["modalities"], "no modality probed"
    assert sum(m["results"]["planted"]["pointing_studies"] for m in s["modalities"].values()) > 0
    for mod, m in s["modalities"].items():
        r = m["results"]
        assert set(r) == {"position", "planted", "noise"}
        assert m["test_lesion_tokens"] > 0
        assert r["planted"]["token_auroc"]["estimate"] > 0.97, (mod, r["planted"])
        assert abs(r["noise"]["token_auroc"]["estimate"] - 0.5) < 0.25, (mod, r["noise"])
        assert r["noise"]["planted_minus_this_token_auroc"]["estimate"] > 0.25
        if r["planted"]["pointing_studies"]:
            assert r["planted"]["pointing_hit_rate"]["estimate"] == 1.0
            assert r["planted"]["pointing_uniform"] < 0.5
    assert os.path.getsize(tmp_path / "out" / "lesion_probe.json") > 100
    with pytest.raises(NeuroVFMError, match="site secret"):
        lesion_probe({"planted": good}, arch, cache_dir, None, cfg, keyer=Keyer(b"another-secret"))
