"""`neurovfm evaluate` on a tiny synthetic archive, end to end through the real CLI: synth ->
ingest -> rekey -> embed (two encoders and the histogram baseline) -> heads -> calibrated,
bootstrapped, triaged test metrics, plots, one HTML page, heads saved in the model folder.
And the rule a reviewer checks first: nothing is fitted on the test split."""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
import pytest

from neurovfm.cli import main as cli_main
from neurovfm.eval.data import LabelTableError, read_study_table
from neurovfm.eval.experiment import EvalConfig, fit_modality
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.models.folder import read_config
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import EmbedConfig, FeatureStore, embed
from neurovfm.probe.train import HeadTrainConfig, load_head, predict
from neurovfm.synth.archive import write_archive
from neurovfm.synth.rekey import rekey_archive

N_STUDIES, SEED = 16, 1  # every split has studies of both modalities


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    t0 = time.time()
    arch = str(root / "archive")
    write_archive(arch, N_STUDIES, SEED, workers=2, progress=False)
    keyer = Keyer(b"evaluate-test")
    cache = str(root / "cache")
    run_ingest(os.path.join(arch, "dicom"), cache, IngestOptions(progress=False, workers=2), keyer=keyer)
    labels, _ = rekey_archive(arch, str(root / "keyed"), keyer)
    feats = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = str(root / f"model_{name}")
        assert cli_main(["init-model", model, "--size", "tiny", "--seed", str(seed)]) == 0
        feats[name] = str(root / f"feat_{name}")
        embed(model, cache, feats[name], EmbedConfig(), progress=False)
    feats["hist"] = str(root / "feat_hist")
    embed("histogram:16", cache, feats["hist"], EmbedConfig(), progress=False)
    return {"root": root, "cache": cache, "labels": labels, "feats": feats, "setup_s": time.time() - t0}


def test_evaluate_cli_end_to_end(world):
    out = str(world["root"] / "eval")
    model = str(world["root"] / "model_a")
    f = world["feats"]
    t0 = time.time()
    rc = cli_main(["evaluate", "--features", f"a={f['a']}", f"b={f['b']}", f"hist={f['hist']}",
                   "--labels", world["labels"], "--cache", world["cache"], "--out", out,
                   "--min-test-positives", "1", "--bootstrap", "200", "--epochs", "4", "--save-model", model,
                   "--quiet"])
    took = time.time() - t0
    assert rc == 0
    assert took < 180, f"tiny evaluate took {took:.0f} s"  # the command itself (setup: synth, ingest, embed)
    with open(os.path.join(out, "metrics.json")) as fh:
        m = json.load(fh)
    assert set(m["models"]) == {"a", "b", "hist"}
    assert set(m["comparisons"]) == {"a - b", "a - hist"}
    for name, per in m["models"].items():
        assert set(per) == {"CT", "MR"}
        for mod, e in per.items():
            scored = [r for r in e["labels"] if r.get("auroc") is not None]
            assert scored, (name, mod)
            for r in scored:
                assert 0 <= r["auroc"] <= 1 and 0 <= r["auprc"] <= 1
                assert 0 <= r["ece_after"] <= 1 and 0 <= r["op_flag_rate"] <= 1
            if e["headline_labels"]:
                ci = e["macro_auroc"]
                assert ci["low"] <= ci["estimate"] <= ci["high"]
            assert e["triage"]["levels"] and sum(e["triage"]["levels"].values()) == e["test_studies"]
            assert 0 <= e["attention_on_nonbrain_tokens"] <= 1
            assert "kernel" in e["breakdowns"] or not e["headline_labels"]
    with open(os.path.join(out, "metrics.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"a", "b", "hist"}
    page = open(os.path.join(out, "index.html")).read()
    assert "Macro AUROC" in page and "roc_ct.png" in page
    for fig in ("roc_ct.png", "pr_mr.png", "reliability_ct.png"):
        assert os.path.getsize(os.path.join(out, fig)) > 1000
    # galleries: the most confident mistakes of the first model, really mistakes, most confident first
    for mod, gal in m["galleries"].items():
        t = read_study_table(world["labels"], mod, studies=set(FeatureStore(f["a"]).studies()))
        for kind, truth in (("false_positives", 0), ("false_negatives", 1)):
            rows_g = gal.get(kind, [])
            for r in rows_g:
                assert t.y[t.study_keys.index(r["study_key"]), t.labels.index(r["label"])] == truth
                assert os.path.getsize(os.path.join(out, r["file"])) > 1000 and r["file"] in page
            ps = [r["p"] for r in rows_g]
            assert ps == sorted(ps, reverse=(truth == 0))
    assert any(m["galleries"][mod].get("false_positives") for mod in m["galleries"])
    assert set(read_config(model)["ood"]) == {"CT", "MR"}  # distance-to-training for analyze
    # heads, calibration and thresholds saved in the model folder reproduce the test predictions
    head, meta = load_head(model, "head_mr")
    fs = FeatureStore(f["a"])
    t = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    assert meta["labels"] == t.labels and set(meta["thresholds"]) == set(t.labels)
    assert meta["calibration"]


def test_nothing_is_fitted_on_test(world):
    """Change every test label: the head, the calibration and the thresholds must not move."""
    fs = FeatureStore(world["feats"]["a"])
    cfg = EvalConfig(train=HeadTrainConfig(epochs=3, seed=0), bootstrap=100, min_test_positives=1)
    t1 = read_study_table(world["labels"], "CT", studies=set(fs.studies()))
    r1 = fit_modality("a", fs, t1, cfg)
    t2 = read_study_table(world["labels"], "CT", studies=set(fs.studies()))
    te = t2.index("test")
    t2.y[te] = np.where(np.isnan(t2.y[te]), np.nan, 1 - t2.y[te])
    r2 = fit_modality("a", fs, t2, cfg)
    np.testing.assert_array_equal(r1.probs_test, r2.probs_test)
    np.testing.assert_array_equal(r1.thresholds, r2.thresholds)
    # and the predictions are the head's own on the test bags
    logits, _ = predict(r1.head, [fs.bag(t1.study_keys[i]) for i in te])
    np.testing.assert_allclose(np.asarray(logits), r1.logits_test, rtol=1e-5, atol=1e-5)


def test_label_table_errors(world, tmp_path):
    src = world["labels"]
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = tmp_path / "bad.csv"
    cols = [c for c in rows[0] if c != "split"]
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(LabelTableError, match="split"):
        read_study_table(str(bad), "CT")
    lab = "intracranial_hemorrhage"
    rows2 = [dict(r) for r in rows]
    first_ct = next(r for r in rows2 if r["modality"] == "CT")
    first_ct[lab] = "maybe"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows2)
    with pytest.raises(LabelTableError, match="not 0/1"):
        read_study_table(str(bad), "CT")
    assert cli_main(["evaluate", "--features", str(tmp_path / "nope"), "--labels", src,
                     "--out", str(tmp_path / "o"), "--quiet"]) == 2
