"""`neurovfm evaluate` on a tiny synthetic archive, end to end through the real CLI: synth ->
ingest -> rekey -> embed (two encoders and the histogram baseline) -> heads -> calibrated,
bootstrapped, triaged test metrics, plots, one HTML page, heads saved in the model folder.
And the rule a reviewer checks first: nothing is fitted on the test split."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from neurovfm.cli import main as cli_main
from neurovfm.eval import metrics as M
from neurovfm.eval.data import LabelTableError, read_study_table
from neurovfm.eval.experiment import HEAD_KINDS, EvalConfig, EvaluationError, evaluate, fit_modality
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.models.folder import read_config
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import EmbedConfig, FeatureStore, embed
from neurovfm.probe.heads import HeadConfig
from neurovfm.probe.train import HeadTrainConfig, load_head, predict
from neurovfm.tokens.cache import TokenCache
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
    # predictions.csv recomputes the reported numbers: AUROC from the head's raw scores (calibration
    # never changes discrimination), ECE from the calibrated probabilities, decisions at the thresholds
    with open(os.path.join(out, "predictions.csv"), newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert not any(k in preds[0] for k in ("study_uid", "patient_id", "name"))
    checked = 0
    for name, per in m["models"].items():
        for mod, e in per.items():
            for r in e["labels"]:
                if r.get("auroc") is None:
                    continue
                sel = [p for p in preds if p["model"] == name and p["modality"] == mod and p["label"] == r["label"]]
                y = np.array([float(p["truth"]) for p in sel])
                assert len(sel) == r["test_n"]
                assert M.auroc(y, np.array([float(p["prob_raw"]) for p in sel])) == pytest.approx(r["auroc"], abs=1e-4)
                q = np.array([float(p["prob_calibrated"]) for p in sel])
                assert M.ece(y, q) == pytest.approx(r["ece_after"], abs=1e-4)
                assert r["threshold"] is None or \
                    [int(p["decision"]) for p in sel] == [int(v >= r["threshold"] - 1e-6) for v in q]
                assert r["ece_after_floor"] > 0 and 0 < r["ece_after_p"] <= 1
                checked += 1
    assert checked > 10
    # bench/eval/paired_from_predictions.py: any pair, after the fact, from the saved predictions; the
    # pair evaluate reported comes out the same (AUROC from 6-decimal probabilities), the reverse negated
    import importlib.util
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "eval",
                          "paired_from_predictions.py")
    spec = importlib.util.spec_from_file_location("paired", script)
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    pp = paired.read_predictions(os.path.join(out, "predictions.csv"))
    for mod, d in paired.compare(pp, m, "a", "b", 200, 0).items():
        ref = m["comparisons"]["a - b"][mod]
        for k in ("estimate", "low", "high"):
            assert d[k] == pytest.approx(ref[k], abs=2e-3), (mod, k)
    back = paired.compare(pp, m, "b", "a", 200, 0)
    assert back and all(back[mod]["estimate"] == pytest.approx(-m["comparisons"]["a - b"][mod]["estimate"], abs=2e-3)
                        for mod in back)
    # the same pairs from two runs (here the one run's files split by model) through --run
    split = {}
    for keep in (("a",), ("b", "hist")):
        d = os.path.join(out, "split_" + "_".join(keep))
        os.makedirs(d)
        with open(os.path.join(d, "predictions.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(preds[0]))
            w.writeheader()
            w.writerows(p for p in preds if p["model"] in keep)
        with open(os.path.join(d, "metrics.json"), "w") as fh:
            json.dump(dict(m, models={k: v for k, v in m["models"].items() if k in keep}), fh)
        split[keep] = [os.path.join(d, "predictions.csv"), os.path.join(d, "metrics.json")]
    r = subprocess.run([sys.executable, script, *split[("a",)], "--run", *split[("b", "hist")], "--pair", "a", "b",
                        "--pair", "hist", "a"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)["comparisons"]
    for mod, d in paired.compare(pp, m, "a", "b", 200, 0).items():
        assert two["a - b"][mod]["estimate"] == pytest.approx(d["estimate"], abs=1e-12)
        assert two["a - b"][mod]["low"] == pytest.approx(d["low"], abs=1e-12)
    assert set(two["hist - a"]) == set(two["a - b"])
    with open(split[("a",)][1]) as fh:
        other_seed = dict(json.load(fh))
    other_seed["config"] = dict(other_seed["config"], seed=int(other_seed["config"].get("seed", 0)) + 1)
    with open(os.path.join(out, "seed1.json"), "w") as fh:
        json.dump(other_seed, fh)
    seed1 = [split[("a",)][0], os.path.join(out, "seed1.json")]
    for first, run, why in ((split[("b", "hist")], seed1, "differ in seed"),
                            (split[("a",)], split[("a",)], "is in two runs")):
        r = subprocess.run([sys.executable, script, *first, "--run", *run, "--pair", "a", "b"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the same run twice, told apart by a suffix: each model minus its renamed self is exactly zero
    r = subprocess.run([sys.executable, script, *split[("a",)], "--run", *split[("a",)], "_again", "--pair", "a",
                        "a_again"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    same = json.loads(r.stdout)["comparisons"]["a - a_again"]
    assert same and all(d["estimate"] == 0 and d["low"] == 0 and d["high"] == 0 for d in same.values())
    r = subprocess.run([sys.executable, script, *split[("a",)], "--suffix", "_x", "--run", *split[("b", "hist")],
                        "--pair", "a_x", "b"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["comparisons"]["a_x - b"] == two["a - b"]
    # --pooled: replicates averaged on shared resamples; mean(a, b) - mean(hist, a again) is (b - hist) / 2
    r = subprocess.run([sys.executable, script, *split[("a",)], "--run", *split[("b", "hist")], "--run",
                        *split[("a",)], "_again", "--pooled", "a,b", "hist,a_again"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pool = json.loads(r.stdout)["comparisons"]["mean(a, b) - mean(hist, a_again)"]
    b_hist = paired.compare(pp, m, "b", "hist", 200, 0)
    assert pool and set(pool) == set(b_hist)
    for mod, d in pool.items():
        assert d["estimate"] == pytest.approx(b_hist[mod]["estimate"] / 2, abs=1e-12)
        assert d["a_replicates"] == pytest.approx([two["a - b"][mod]["a"], two["a - b"][mod]["b"]], abs=1e-12)
        assert d["low"] <= d["estimate"] <= d["high"]
        # paired by position: a - hist and b - a_again, one difference per "seed"
        assert d["replicate_t"]["differences"] == pytest.approx(
            [two["a - b"][mod]["a"] - b_hist[mod]["b"], two["a - b"][mod]["b"] - two["a - b"][mod]["a"]], abs=1e-12)
        assert d["verdict"] == M.replication_verdict(d)  # the decision rule travels with the numbers
    with open(os.path.join(out, "list.json"), "w") as fh:
        json.dump([1, 2], fh)  # valid JSON, not an evaluate summary
    pred, good = os.path.join(out, "predictions.csv"), os.path.join(out, "metrics.json")
    for summary, argv, why in ((good, ["--pair", "a", "nope"], "two different models among"),
                               (good, ["--pair", "a", "a"], "two different"),
                               (pred, ["--pair", "a", "b"], "not an evaluate run"),  # a CSV where the JSON belongs
                               (os.path.join(out, "list.json"), ["--pair", "a", "b"], "not an evaluate run"),
                               (good, ["--pair", "a", "b", "--run", pred], "--run takes PREDICTIONS METRICS"),
                               (good, ["--pooled", "a,b", "b"], "disjoint lists"),
                               (good, [], "at least one --pair or --pooled")):
        r = subprocess.run([sys.executable, script, pred, summary, *argv], capture_output=True, text=True)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    cr = m["models"]["a"]["CT"].get("calibration_resolution") or m["models"]["a"]["MR"]["calibration_resolution"]
    assert cr["pooled_n"] > 0 and cr["ece_floor_mean"] > 0 and cr["test_studies_for_floor_0_05_median"] > 0
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


def test_save_model_records_the_readout_and_refuses_another_encoder(world, tmp_path):
    """Heads go only into the folder whose encoder made the features (checked before any head is
    trained), and record that encoder and the blocks the features were read from, so that
    `analyze` encodes a study exactly as the heads were fitted."""

    from neurovfm.probe.embed import encoder_id

    root = world["root"]
    feats = str(tmp_path / "feat_mid")
    embed(str(root / "model_a"), world["cache"], feats, EmbedConfig(layers=[5, -1]), progress=False)
    saved = str(tmp_path / "model_copy")
    shutil.copytree(str(root / "model_a"), saved)
    args = ["evaluate", "--features", f"mid={feats}", "--labels", world["labels"], "--min-test-positives", "1",
            "--bootstrap", "100", "--epochs", "2", "--head", "mean", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "e1"), "--save-model", saved]) == 0
    heads = read_config(saved)["heads"]
    assert set(heads) == {"head_ct", "head_mr"}
    for h in heads.values():
        assert h["features"] == {"encoder_id": encoder_id(saved), "readout_layers": [5, 11], "histogram_bins": None}
    with open(tmp_path / "e1" / "metrics.json") as fh:  # the record names the blocks too
        assert json.load(fh)["features"]["mid"]["readout_layers"] == [5, 11]
    other = str(root / "model_b")
    before = read_config(other)
    assert cli_main(args + ["--out", str(tmp_path / "e2"), "--save-model", other]) == 2
    assert read_config(other) == before and not os.path.exists(str(tmp_path / "e2" / "metrics.json"))
    with pytest.raises(EvaluationError, match="did not make"):
        evaluate({"hist": world["feats"]["hist"]}, world["labels"], str(tmp_path / "e3"), save_model=saved,
                 progress=False)


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


def test_auto_head_is_chosen_on_validation(world):
    """--head auto keeps the kind with the best validation macro AUROC; flipping every test label
    changes neither the choice nor the test predictions."""
    fs = FeatureStore(world["feats"]["a"])
    cfg = EvalConfig(train=HeadTrainConfig(epochs=2, seed=0), bootstrap=100, min_test_positives=1, head_auto=True)
    t1 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    r1 = fit_modality("a", fs, t1, cfg)
    best = {}
    for kind in HEAD_KINDS:
        one = EvalConfig(train=cfg.train, bootstrap=100, min_test_positives=1, head=HeadConfig(kind=kind))
        best[kind] = max(h["val_macro_auroc"] for h in fit_modality("a", fs, t1, one).history)
    assert set(best) == {"gated", "abmil", "mean", "topk"}
    assert r1.head_cfg.kind == max(best, key=lambda k: (best[k], -HEAD_KINDS.index(k)))
    t2 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    te = t2.index("test")
    t2.y[te] = np.where(np.isnan(t2.y[te]), np.nan, 1 - t2.y[te])
    r2 = fit_modality("a", fs, t2, cfg)
    assert r2.head_cfg.kind == r1.head_cfg.kind
    np.testing.assert_array_equal(r1.probs_test, r2.probs_test)


def test_head_seed_ensemble_is_chosen_on_validation_and_averages_its_members(world):
    """--head-seeds 3 with --head auto: the kind is the one a single auto head chooses, member 0
    *is* that head, the test logits are the mean of the members', and nothing moves when every
    test label is flipped."""
    fs = FeatureStore(world["feats"]["a"])
    train = HeadTrainConfig(epochs=2, seed=0)
    single = EvalConfig(train=train, bootstrap=100, min_test_positives=1, head_auto=True)
    ens = EvalConfig(train=train, bootstrap=100, min_test_positives=1, head_auto=True, head=HeadConfig(ensemble=3))
    t1 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    r1, re = fit_modality("a", fs, t1, single), fit_modality("a", fs, t1, ens)
    assert re.head_cfg.kind == r1.head_cfg.kind and re.head_cfg.ensemble == 3
    assert re.member_logits_test.shape == (3, *r1.logits_test.shape)
    np.testing.assert_allclose(re.member_logits_test[0], r1.logits_test, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(re.logits_test, re.member_logits_test.mean(0), rtol=1e-5, atol=1e-5)
    assert sorted({h["member"] for h in re.history}) == [0, 1, 2]
    t2 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    te = t2.index("test")
    t2.y[te] = np.where(np.isnan(t2.y[te]), np.nan, 1 - t2.y[te])
    np.testing.assert_array_equal(fit_modality("a", fs, t2, ens).probs_test, re.probs_test)


def test_cli_head_seed_ensemble(world, tmp_path):
    """`--head-seeds 2`: the metrics name the ensemble and report each member's headline macro
    AUROC (the seed spread) beside the ensemble's, which is the one the intervals describe; a
    size below one is refused with the reason."""
    out = str(tmp_path / "eval")
    f = world["feats"]
    base = ["evaluate", "--features", f"a={f['a']}", "--labels", world["labels"], "--out", out,
            "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "2", "--head", "mean", "--quiet"]
    assert cli_main(base + ["--head-seeds", "2"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    for mod, e in m["models"]["a"].items():
        assert e["head"] == "mean (mean logit of 2 seeds)"
        hm = e["head_members"]
        assert hm["seeds"] == 2 and len(hm["member_macro_auroc"]) == 2
        assert hm["member_range"] == [min(hm["member_macro_auroc"]), max(hm["member_macro_auroc"])]
        assert hm["ensemble_macro_auroc"] == pytest.approx(e["macro_auroc"]["estimate"], abs=1e-9), mod
    assert "each seed's head" in open(os.path.join(out, "index.html")).read()
    assert cli_main(base + ["--head-seeds", "0"]) == 2


def test_cli_standardised_head_is_named_saved_and_shared_by_the_experiment_commands(world, tmp_path, monkeypatch):
    """`--standardize`: the metrics name it, the saved head carries its training-split statistics
    and reloads to the same test logits; transfer and label-efficiency take the same head options
    and record them."""
    f = world["feats"]
    out, model = str(tmp_path / "eval"), str(tmp_path / "model")
    shutil.copytree(str(world["root"] / "model_a"), model)  # heads go into the folder of the encoder behind 'a'
    assert cli_main(["evaluate", "--features", f"a={f['a']}", "--labels", world["labels"], "--out", out,
                     "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "2", "--head", "gated",
                     "--standardize", "--save-model", model, "--modalities", "CT", "--quiet"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["models"]["a"]["CT"]["head"] == "gated, standardised features"
    head, meta = load_head(model, "head_ct")
    assert meta["head"]["standardize"] is True
    store = FeatureStore(f["a"])
    with open(world["labels"], newline="") as fh:
        split = {r["study_key"]: r["split"] for r in csv.DictReader(fh)}
    ct = [k for k in store.studies() if store.modality(k) == "CT"]
    train_tokens = np.concatenate([store.bag(k, dtype=np.float32) for k in ct if split[k] == "train"]).astype(np.float64)
    # the statistics are the training split's tokens', nothing else's
    np.testing.assert_allclose(head.pre.mean.numpy(), train_tokens.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.pre.inv_std.numpy(), 1 / train_tokens.std(0), rtol=1e-3)
    with open(os.path.join(out, "predictions.csv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] == "a" and r["modality"] == "CT"]
    studies = sorted({r["study"] for r in rows})
    logits, _ = predict(head, [store.bag(k, dtype=np.float32) for k in studies])
    raw = {(r["study"], r["label"]): float(r["prob_raw"]) for r in rows}
    for i, k in enumerate(studies):  # the saved head gives the test predictions the evaluation wrote
        for j, lab in enumerate(meta["labels"]):
            if (k, lab) in raw:
                assert 1 / (1 + np.exp(-logits[i, j])) == pytest.approx(raw[(k, lab)], abs=2e-6)
    tr = str(tmp_path / "transfer")
    assert cli_main(["transfer", "--features", f"a={f['a']}", "--labels", world["labels"], "--out", tr,
                     "--epochs", "2", "--min-test-positives", "1", "--bootstrap", "100", "--standardize",
                     "--head-seeds", "2", "--quiet"]) == 0
    hc = json.load(open(os.path.join(tr, "transfer.json")))["config"]["head"]
    assert hc["standardize"] is True and hc["ensemble"] == 2
    le = str(tmp_path / "eff")
    assert cli_main(["label-efficiency", "--features", f"a={f['a']}", "--labels", world["labels"], "--out", le,
                     "--positives", "2,all", "--repeats", "1", "--epochs", "2", "--min-test-positives", "1",
                     "--standardize", "--quiet"]) == 0
    assert json.load(open(os.path.join(le, "label_efficiency.json")))["config"]["head"]["standardize"] is True
    # with seed ensembles no two repeats share a head seed (single heads keep seed + repeat)
    import neurovfm.eval.efficiency as eff

    seeds, real = [], eff.fit_head

    def recording(*args, **kw):
        seeds.append(args[4].seed)  # the HeadTrainConfig each repeat's heads are fitted with
        return real(*args, **kw)

    monkeypatch.setattr(eff, "fit_head", recording)
    table = eff.restrict(read_study_table(world["labels"], "CT", None, set(store.studies())), meta["labels"][:2])
    for ens, want in ((2, [0, 2, 4]), (1, [0, 1, 2])):
        seeds.clear()
        eff.run_modality("a", store, table, eff.EfficiencyConfig(
            head=HeadConfig(kind="mean", ensemble=ens), train=HeadTrainConfig(epochs=1, seed=0),
            positives=[None], repeats=3, min_test_positives=1))
        assert seeds == want
    assert cli_main(["transfer", "--features", f"a={f['a']}", "--labels", world["labels"], "--out", tr,
                     "--head-seeds", "0", "--quiet"]) == 2


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


# -- emergent properties: cross-modal transfer and label efficiency -------------------------------
def _ct_mri_rows() -> set[tuple[str, str]]:
    import neurovfm.synth as synth_pkg

    with open(os.path.join(os.path.dirname(synth_pkg.__file__), "tables", "ct_mri_labels.csv"), newline="") as fh:
        return {(r["ct_label"], r["mri_label"]) for r in csv.DictReader(fh)}


def test_transfer_cli_end_to_end(world):
    out = str(world["root"] / "transfer")
    f = world["feats"]
    assert cli_main(["transfer", "--features", f"a={f['a']}", f"b={f['b']}", f"hist={f['hist']}",
                     "--labels", world["labels"], "--out", out, "--epochs", "2", "--min-test-positives", "1",
                     "--bootstrap", "100", "--quiet"]) == 0
    with open(os.path.join(out, "transfer.json")) as fh:
        m = json.load(fh)
    assert os.path.getsize(os.path.join(out, "transfer.png")) > 1000
    table = _ct_mri_rows()
    with open(world["labels"], newline="") as fh:
        cols = set(next(csv.reader(fh)))
    assert set(m["results"]) == {"a", "b", "hist"}
    n_rows, scored = 0, 0
    for name, per in m["results"].items():
        assert set(per) == {"CT->MR", "MR->CT"}
        for d, s in per.items():
            assert s["pairs"]
            for r in s["pairs"]:
                n_rows += 1
                src, tgts = r["source_label"], r["target_labels"]
                # every pair is a real row of the table, and the union covers every mapped label present
                rows = {(src, t) if d == "CT->MR" else (t, src) for t in tgts}
                assert rows <= table, rows - table
                every = {b for a, b in table if a == src} if d == "CT->MR" else {a for a, b in table if b == src}
                assert set(tgts) == every & cols
                for k in ("auroc", "auroc_low", "auroc_high", "reference_auroc", "reference_low", "reference_high"):
                    assert r[k] is None or 0 <= r[k] <= 1
                scored += r["auroc"] is not None
                assert not r["in_macro"] or (r["target_test_positives"] >= 1 and r["auroc"] is not None)
            if s["macro_pairs"]:
                ci = s["macro_auroc"]
                assert ci["low"] <= ci["estimate"] <= ci["high"] and 0 <= ci["estimate"] <= 1
    assert scored
    with open(os.path.join(out, "transfer.csv"), newline="") as fh:
        assert len(list(csv.DictReader(fh))) == n_rows


def test_transfer_is_not_fitted_on_test(world):
    """Flip every MRI test label: both heads' predictions stay, only the CT->MR scores move."""
    from neurovfm.eval import metrics as M
    from neurovfm.eval.transfer import TransferConfig, fit_feature_set, read_tables

    fs = FeatureStore(world["feats"]["a"])
    by_mod = {mod: {k for k in fs.studies() if fs.modality(k) == mod} for mod in ("CT", "MR")}
    cfg = TransferConfig(train=HeadTrainConfig(epochs=2, seed=0), bootstrap=100, min_test_positives=1)
    r1 = fit_feature_set(fs, read_tables(world["labels"], by_mod), cfg)
    tabs = read_tables(world["labels"], by_mod)
    te = tabs["MR"].index("test")
    tabs["MR"].y[te] = np.where(np.isnan(tabs["MR"].y[te]), np.nan, 1 - tabs["MR"].y[te])
    r2 = fit_feature_set(fs, tabs, cfg)
    for d in ("CT->MR", "MR->CT"):
        np.testing.assert_array_equal(r1[d].transfer, r2[d].transfer)
        np.testing.assert_array_equal(r1[d].reference, r2[d].reference)
    np.testing.assert_array_equal(r1["MR->CT"].y, r2["MR->CT"].y)
    a, b = r1["CT->MR"], r2["CT->MR"]
    flipped = 0
    for j, p in enumerate(a.pairs):
        if len(p.target_labels) == 1:
            np.testing.assert_array_equal(b.y[:, j], np.where(np.isnan(a.y[:, j]), np.nan, 1 - a.y[:, j]))
            s1, s2 = M.auroc(a.y[:, j], a.transfer[:, j]), M.auroc(b.y[:, j], b.transfer[:, j])
            if np.isfinite(s1):
                assert s2 == pytest.approx(1 - s1)
                flipped += 1
    assert flipped
    # the transfer scores are the CT head's own predictions on the MR test bags
    logits, _ = predict(a.source.head, [fs.bag(k) for k in a.study_keys])
    cols = [a.source.columns.index((p.source_label,)) for p in a.pairs]
    np.testing.assert_allclose(np.asarray(logits)[:, cols], a.transfer, rtol=1e-5, atol=1e-5)


def test_label_efficiency_cli_and_subsamples(world):
    from neurovfm.eval.efficiency import subsample_positives

    out = str(world["root"] / "efficiency")
    f = world["feats"]
    assert cli_main(["label-efficiency", "--features", f"a={f['a']}", f"b={f['b']}", f"hist={f['hist']}",
                     "--labels", world["labels"], "--out", out, "--positives", "1,2,all", "--repeats", "2",
                     "--epochs", "2", "--min-test-positives", "1", "--quiet"]) == 0
    with open(os.path.join(out, "label_efficiency.json")) as fh:
        m = json.load(fh)
    assert os.path.getsize(os.path.join(out, "label_efficiency.png")) > 1000
    with open(os.path.join(out, "label_efficiency.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    mods = [mod for mod in ("CT", "MR") if m["labels"].get(mod)]
    assert mods
    keys = [(r["features"], r["modality"], r["positives"], int(r["repeat"])) for r in rows]
    assert sorted(keys) == sorted((n, mod, p, r) for n in ("a", "b", "hist") for mod in mods
                                  for p in ("1", "2", "all") for r in range(2))
    for r in m["rows"]:
        for lab, u in r["per_label"].items():
            cap = u["positives_available"] if r["positives"] == "all" else min(int(r["positives"]),
                                                                              u["positives_available"])
            assert u["positives_used"] == cap and u["positives_available"] >= 1
        assert r["macro_auroc"] is None or 0 <= r["macro_auroc"] <= 1
    # subsamples: nested, negatives kept, 'all' (and any budget above every count) is the full split
    fs = FeatureStore(f["a"])
    for mod in mods:
        t = read_study_table(world["labels"], mod, studies=set(fs.studies()))
        full = t.y[t.index("train")]
        np.testing.assert_array_equal(subsample_positives(t, None, 0, 0), full)
        np.testing.assert_array_equal(subsample_positives(t, 10**6, 0, 1), full)
        y1, y2 = subsample_positives(t, 1, 0, 0), subsample_positives(t, 2, 0, 0)
        np.testing.assert_array_equal(y1 == 0, full == 0)
        assert ((y1 == 1) <= (y2 == 1)).all() and ((y2 == 1) <= (full == 1)).all()
        np.testing.assert_array_equal((y1 == 1).sum(0), np.minimum(1, (full == 1).sum(0)))
        np.testing.assert_array_equal(y1, subsample_positives(t, 1, 0, 0))  # deterministic by seed


def test_cnn_baseline_through_evaluate(world, tmp_path):
    """`evaluate --cnn-baseline`: the end-to-end 3-D CNN is scored like every head (calibration,
    operating points, paired bootstrap against the first feature set), and nothing of it is fitted
    on the test split: flipping every test label leaves its test predictions unchanged."""
    from neurovfm.eval.experiment import CNN_NAME, fit_cnn_modality
    from neurovfm.probe.cnn3d import CNNConfig

    out = str(tmp_path / "eval")
    f = world["feats"]
    assert cli_main(["evaluate", "--features", f"a={f['a']}", "--labels", world["labels"], "--cache", world["cache"],
                     "--out", out, "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "2",
                     "--cnn-baseline", "--cnn-epochs", "2", "--quiet"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m["models"]) == {"a", CNN_NAME} and set(m["comparisons"]) == {f"a - {CNN_NAME}"}
    for mod, e in m["models"][CNN_NAME].items():
        assert e["head"] == "3-D CNN, end to end, anti-aliased inputs" and e["test_studies"] == m["models"]["a"][mod]["test_studies"]
        assert [r for r in e["labels"] if r.get("auroc") is not None], mod
        assert len(e["history"]) == 2 and e["attention_on_nonbrain_tokens"] is None
    fs = FeatureStore(f["a"])
    cfg = EvalConfig(bootstrap=100, min_test_positives=1, cnn=CNNConfig(epochs=2, seed=0, threads=1))
    t1 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    r1 = fit_cnn_modality(t1, world["cache"], cfg, progress=False)
    t2 = read_study_table(world["labels"], "MR", studies=set(fs.studies()))
    te = t2.index("test")
    t2.y[te] = np.where(np.isnan(t2.y[te]), np.nan, 1 - t2.y[te])
    r2 = fit_cnn_modality(t2, world["cache"], cfg, progress=False)
    np.testing.assert_array_equal(r1.logits_test, r2.logits_test)
    np.testing.assert_array_equal(r1.thresholds, r2.thresholds)
    with pytest.raises(EvaluationError, match="--cache"):
        evaluate({"a": f["a"]}, world["labels"], str(tmp_path / "x"), cfg)


def test_cli_cnn_seed_ensemble(world, tmp_path):
    """`--cnn-seeds N` trains N networks per modality and names the ensemble in the metrics;
    without `--cnn-baseline` it is refused with the reason instead of being ignored."""
    out = str(tmp_path / "eval")
    f = world["feats"]
    base = ["evaluate", "--features", f"a={f['a']}", "--labels", world["labels"], "--cache", world["cache"],
            "--out", out, "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "1", "--quiet"]
    assert cli_main(base + ["--cnn-baseline", "--cnn-epochs", "1", "--cnn-seeds", "2"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    for e in m["models"]["cnn3d"].values():
        assert e["head"] == "3-D CNN, end to end, anti-aliased inputs (mean logit of 2 seeds)"
    assert cli_main(base + ["--cnn-seeds", "2"]) == 2
    assert cli_main(base + ["--cnn-baseline", "--cnn-seeds", "0"]) == 2


def test_cli_cnn_sampling_reaches_the_inputs_and_is_named(world, tmp_path):
    """Anti-aliased inputs are the default and named in the metrics; `--cnn-point-sampled` changes
    what the CNN sees (its study volumes differ) and keeps the old name; `--cnn-inplane-mm 2` puts
    them on the finer grid and says so; without `--cnn-baseline` either flag is refused instead of
    being ignored."""
    from neurovfm.probe import cnn3d

    f = world["feats"]
    keys = FeatureStore(f["a"]).studies()[:2]
    cache = TokenCache(world["cache"])
    try:
        plain, smooth = cnn3d.study_volumes(cache, keys, antialias=False), cnn3d.study_volumes(cache, keys)
        fine = cnn3d.study_volumes(cache, keys, grid=cnn3d.StudyGrid.of(2.0))
    finally:
        cache.close()
    for k in keys:
        assert plain[k][0].shape == smooth[k][0].shape and not np.array_equal(plain[k][0], smooth[k][0])
        assert fine[k][0].shape == smooth[k][0].shape[:1] + (40, 108, 90)
    out = str(tmp_path / "eval")
    base = ["evaluate", "--features", f"a={f['a']}", "--labels", world["labels"], "--cache", world["cache"],
            "--out", out, "--min-test-positives", "1", "--bootstrap", "100", "--epochs", "1", "--quiet"]
    scores = []
    for flags, name in (([], "3-D CNN, end to end, anti-aliased inputs"),
                        (["--cnn-point-sampled"], "3-D CNN, end to end"),
                        (["--cnn-inplane-mm", "2"], "3-D CNN, end to end, anti-aliased inputs, 2 mm grid")):
        assert cli_main(base + ["--cnn-baseline", "--cnn-epochs", "1", *flags]) == 0
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert {e["head"] for e in m["models"]["cnn3d"].values()} == {name}
        with open(os.path.join(out, "predictions.csv")) as fh:
            scores.append([r["prob_raw"] for r in csv.DictReader(fh) if r["model"] == "cnn3d"])
    assert scores[0] and len(scores[0]) == len(scores[1]) == len(scores[2])
    assert scores[0] != scores[1] and scores[0] != scores[2]  # the flags reached the inputs
    assert cli_main(base + ["--cnn-point-sampled"]) == 2
    assert cli_main(base + ["--cnn-inplane-mm", "2"]) == 2
    assert cli_main(base + ["--cnn-baseline", "--cnn-inplane-mm", "0.5"]) == 2


def test_cli_cnn_epochs_default_is_the_configs():
    """The CLI cannot import torch to read the default, so it repeats it: keep the two equal."""
    from neurovfm.cli import build_parser
    from neurovfm.probe.cnn3d import CNNConfig

    a = build_parser().parse_args(["evaluate", "--features", "x=y", "--labels", "l.csv", "--out", "o"])
    assert a.cnn_epochs == CNNConfig().epochs and a.cnn_inplane_mm == CNNConfig().inplane_mm


def _write_eval(folder: str, name: str, rng, y: np.ndarray, patients: list[str], signal: float, labels: list[str]):
    """An evaluate-shaped folder for one model: predictions.csv scored with planted ``signal`` and
    metrics.json with the fields the replication tools read (its AUROC computed from those scores)."""
    os.makedirs(folder)
    entry = {}
    with open(os.path.join(folder, "predictions.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "modality", "study", "patient", "label", "truth", "prob_raw"])
        for mod in ("CT", "MR"):
            s = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, y.shape))))
            for i in range(len(y)):
                for j, lab in enumerate(labels):
                    w.writerow([name, mod, f"{mod}{i}", patients[i], lab, int(y[i, j]), f"{s[i, j]:.6f}"])
            auc = float(np.mean([M.auroc(y[:, j], s[:, j]) for j in range(len(labels))]))
            entry[mod] = {"head": "mean", "macro_auroc": {"estimate": auc, "low": auc - 0.05, "high": auc + 0.05},
                          "headline_labels": labels, "headline_ece_after": 0.1, "test_studies": len(y)}
    with open(os.path.join(folder, "metrics.json"), "w") as fh:
        json.dump({"config": {"bootstrap": 200, "seed": 0}, "models": {name: entry}}, fh)


def test_seed_replication_refuses_another_variant_in_the_same_out(tmp_path):
    """PRETRAIN_SET is kept in OUT/settings.json on the first run; a rerun into that OUT with another
    variant, or an item that is not key=value, stops (exit 2) before any work."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "eval",
                          "seed_replication.sh")
    out = tmp_path / "rep"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"pretrain_set": "optim.var_cov=1"}) + "\n")
    env = dict(os.environ, PYTHON=sys.executable, NEUROVFM_BIN="/nonexistent", PRETRAIN_SET="optim.intensity_target=1.0")
    r = subprocess.run(["bash", script, str(tmp_path / "data"), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "made with other settings" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists() and json.loads((out / "settings.json").read_text())["pretrain_set"] == "optim.var_cov=1"
    env["PRETRAIN_SET"] = "optim.var_cov"
    r = subprocess.run(["bash", script, str(tmp_path / "data"), str(tmp_path / "other")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "must be key=value" in r.stderr, r.stderr
    env.update(PRETRAIN_SET="", PYTHON=str(tmp_path / "no-python"))  # no settings written without a python
    r = subprocess.run(["bash", script, str(tmp_path / "data"), str(tmp_path / "other")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "set PYTHON" in r.stderr and not (tmp_path / "other" / "settings.json").exists(), r.stderr


def test_replication_record_assembles_what_the_replication_wrote(tmp_path):
    """seed_replication.sh's last steps on planted models: pooled.json from the real
    paired_from_predictions.py, then the record; pretrained seeds planted clearly better than their
    random twins give the verdict "A better", and the pretraining summary equals the CSV's numbers."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "eval")
    rng = np.random.default_rng(3)
    n, labels = 600, ["x", "y", "z"]
    y = (rng.random((n, len(labels))) < 0.3).astype(int)
    patients = [f"p{i // 2}" for i in range(n)]
    out = str(tmp_path / "rep")
    runs = []
    for s in (0, 1):
        loss = rng.random(300)
        os.makedirs(os.path.join(out, f"pt_s{s}"))
        with open(os.path.join(out, f"pt_s{s}", "metrics.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "loss", "erank", "cosine"])
            for k, v in enumerate(loss, 1):
                w.writerow([k, v, *((10 + s, 0.5) if k % 50 == 0 else ("", ""))])
        for kind, signal in (("ref", 2.5), ("random", 0.5)):
            _write_eval(os.path.join(out, f"eval_{kind}_s{s}"), f"{kind}_s{s}", rng, y, patients, signal, labels)
            runs += ["--run", os.path.join(out, f"eval_{kind}_s{s}", "predictions.csv"),
                     os.path.join(out, f"eval_{kind}_s{s}", "metrics.json")]
    _write_eval(os.path.join(out, "eval_histogram"), "histogram", rng, y, patients, 1.0, labels)
    r = subprocess.run([sys.executable, os.path.join(here, "paired_from_predictions.py"),
                        os.path.join(out, "eval_histogram", "predictions.csv"), os.path.join(out, "eval_histogram", "metrics.json"),
                        *runs, "--pooled", "ref_s0,ref_s1", "random_s0,random_s1", "--pair", "ref_s0", "histogram",
                        "--out", os.path.join(out, "pooled.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec_path = str(tmp_path / "record.json")
    r = subprocess.run([sys.executable, os.path.join(here, "replication_record.py"), out, "--data", "A",
                        "--out", rec_path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.load(open(rec_path))
    assert rec["seeds"] == [0, 1] and 'seed_replication.sh A OUT "0 1"' in rec["command"]
    assert rec["verdict"] == {"mean(ref_s0, ref_s1) - mean(random_s0, random_s1)": {"CT": "A better", "MR": "A better"}}
    assert set(rec["models"]) == {"histogram", "ref_s0", "random_s0", "ref_s1", "random_s1"}
    assert rec["models"]["ref_s1"]["MR"]["macro_auroc"] > rec["models"]["random_s1"]["MR"]["macro_auroc"]
    with open(os.path.join(out, "pt_s1", "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    pt = rec["pretraining"]["seed1"]
    assert pt["steps"] == 300 and pt["erank_mean_steps_600_plus"] is None  # no monitor from step 600 on
    assert pt["loss_last_100_mean"] == pytest.approx(np.mean([float(r["loss"]) for r in rows[-100:]]), abs=1e-4)
    os.makedirs(os.path.join(out, "pt_s7"))  # a stray run folder is not one of the compared seeds
    r = subprocess.run([sys.executable, os.path.join(here, "replication_record.py"), out], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["seeds"] == [0, 1], r.stderr
    # a variant's replication: its PRETRAIN_SET in the command, each seed's optimiser settings kept
    optim = {"var_cov": 0.0, "intensity_target": 1.0}
    os.makedirs(os.path.join(out, "pt_s0", "model"))
    with open(os.path.join(out, "pt_s0", "model", "provenance.json"), "w") as fh:
        json.dump({"training": {"config": {"optim": optim}}}, fh)
    with open(os.path.join(out, "settings.json"), "w") as fh:
        json.dump({"pretrain_set": "optim.intensity_target=1.0"}, fh)
    r = subprocess.run([sys.executable, os.path.join(here, "replication_record.py"), out, "--data", "A"],
                       capture_output=True, text=True)
    var = json.loads(r.stdout)
    assert var["command"].startswith("PRETRAIN_SET='optim.intensity_target=1.0' bench/eval/seed_replication.sh A")
    assert var["pretraining"]["seed0"]["optim"] == optim and "optim" not in var["pretraining"]["seed1"]
    assert var["pretrain_set"] == "optim.intensity_target=1.0" and rec["pretrain_set"] == ""
    for damage in ('{"pretrain_set": 3}', "{not json"):
        with open(os.path.join(out, "settings.json"), "w") as fh:
            fh.write(damage)
        r = subprocess.run([sys.executable, os.path.join(here, "replication_record.py"), out], capture_output=True, text=True)
        assert r.returncode != 0 and "settings.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    os.remove(os.path.join(out, "settings.json"))
    bad = os.path.join(out, "eval_random_s1", "metrics.json")
    for damage in ("[1, 2]", "{not json", None):  # wrong shape, corrupt, missing: the file is named
        if damage is None:
            os.remove(bad)
        else:
            with open(bad, "w") as fh:
                fh.write(damage)
        r = subprocess.run([sys.executable, os.path.join(here, "replication_record.py"), out, "--out", rec_path],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "not a finished seed replication" in r.stderr and bad in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert json.load(open(rec_path)) == rec  # the record written before is left as it was


# -- lesion masks of training studies as a token term (--token-masks) ------------------------------------
def test_token_targets_follow_the_archive_masks_and_stay_on_train(world):
    """Every training study's targets are row-aligned with its bag; a token is a lesion token of a
    label only where its mask code is a lesion and the study carries that label; validation and
    test studies get none; another site secret joins nothing."""
    import nibabel as nib

    from neurovfm.eval.anatomy import token_codes
    from neurovfm.probe.token_targets import TokenTargetError, read_study_masks, token_targets
    from neurovfm.synth import tables

    arch = str(world["root"] / "archive")
    keyer = Keyer(b"evaluate-test")
    fs = FeatureStore(world["feats"]["a"])
    masks = read_study_masks(arch, keyer)
    with open(os.path.join(arch, "records.jsonl")) as fh:
        findings = {keyer.study(r["study_uid"]): r["findings"] for r in map(json.loads, fh)}
    assert any(tables.parents(r_mod, f["label"]) for r_mod in ("CT", "MR") for fs_ in findings.values()
               for f in fs_ if f["label"] in tables.label_names(r_mod))  # the archive has implied labels to check
    cache = TokenCache(world["cache"])
    lesion_rows = 0
    for mod in ("CT", "MR"):
        table = read_study_table(world["labels"], mod, studies=set(fs.studies()))
        t = token_targets(fs, world["cache"], arch, table.study_keys, table.labels, keyer=keyer)
        assert len(t) == len(table.study_keys)
        for i, (k, ti) in enumerate(zip(table.study_keys, t)):
            if table.splits[i] != "train":
                assert ti is None
                continue
            assert ti.shape == (len(fs.bag(k)), len(table.labels))
            # a label's lesion tokens only in studies that carry the label
            assert np.all(table.y[i][ti.any(0)] == 1), (mod, k)
            # the rows with any target are exactly the tokens whose mask code is a lesion with a
            # finding in this modality (a painted lesion may have no label here: e.g. not seen on CT)
            codes = np.concatenate([token_codes(cache.get(v.series_key).grid_affine_array, v.coords,
                                                nib.load(masks[k].masks[v.series_key]))[1]
                                    for v in fs.bag_views(k)])
            np.testing.assert_array_equal(ti.any(1), (codes > 0) & np.isin(codes, list(masks[k].lesion_labels)))
            # each finding marks its lesion's tokens for its label and every label it implies
            for f in findings[k]:
                on = codes == f["mask_index"]
                for lab in tables.close_labels(mod, [f["label"]]):
                    assert ti[on, table.labels.index(lab)].all(), (mod, f["label"], lab)
            lesion_rows += int(ti.any(1).sum())
    cache.close()
    assert lesion_rows > 0
    with pytest.raises(TokenTargetError, match="none of the"):
        token_targets(fs, world["cache"], arch, fs.studies(), ["x"], keyer=Keyer(b"another-secret"))
    with pytest.raises(TokenTargetError, match="records.jsonl"):
        read_study_masks(str(world["root"]), keyer)


def test_cli_token_masks_train_heads_and_say_what_they_saw(world, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "evaluate-test")
    arch = str(world["root"] / "archive")
    base = ["evaluate", "--features", f"a={world['feats']['a']}", "--labels", world["labels"], "--epochs", "3",
            "--bootstrap", "100", "--min-test-positives", "1", "--quiet", "--modalities", "MR"]
    assert cli_main(base + ["--out", str(tmp_path / "x"), "--token-masks", arch]) == 2  # no --cache
    assert cli_main(base + ["--out", str(tmp_path / "plain"), "--cache", world["cache"]]) == 0
    assert cli_main(base + ["--out", str(tmp_path / "masked"), "--cache", world["cache"], "--token-masks", arch,
                            "--token-weight", "2", "--token-balance", "per_class"]) == 0
    plain = json.load(open(tmp_path / "plain" / "metrics.json"))
    masked = json.load(open(tmp_path / "masked" / "metrics.json"))
    assert masked["config"]["token_masks"] == arch and masked["config"]["train"]["token_weight"] == 2.0
    assert masked["config"]["train"]["token_balance"] == "per_class"
    ts = masked["models"]["a"]["MR"]["token_supervision"]
    assert ts["balance"] == "per_class" and ts["weight"] == 2.0
    table = read_study_table(world["labels"], "MR", studies=set(FeatureStore(world["feats"]["a"]).studies()))
    assert ts["train_studies"] == ts["train_studies_with_masks"] == len(table.index("train"))
    assert sum(ts["lesion_tokens_per_label"].values()) > 0
    assert "token_supervision" not in plain["models"]["a"]["MR"]
    # the token term trained the head: same seed, other test predictions
    p0 = [r for r in csv.DictReader(open(tmp_path / "plain" / "predictions.csv"))]
    p1 = [r for r in csv.DictReader(open(tmp_path / "masked" / "predictions.csv"))]
    assert [(r["study"], r["label"]) for r in p0] == [(r["study"], r["label"]) for r in p1]
    assert [r["prob_raw"] for r in p0] != [r["prob_raw"] for r in p1]
