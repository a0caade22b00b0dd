"""Metrics against scikit-learn, calibration that really calibrates, bootstrap intervals that
cover the truth at about the nominal rate, operating points and triage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from neurovfm.eval import calibrate as cal
from neurovfm.eval import metrics as M


@pytest.mark.parametrize("seed", range(6))
def test_auroc_auprc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < rng.uniform(0.03, 0.5)).astype(float)
    y[0], y[1] = 1, 0
    s = rng.normal(size=n) + y * rng.uniform(0, 2)
    if seed % 2:  # many ties
        s = np.round(s, 1)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    w = np.ones((3, n))
    assert np.allclose(M.weighted_auroc(y, s, w), roc_auc_score(y, s))
    rep = rng.integers(0, 3, n).astype(float)  # weights = repeating rows
    idx = np.repeat(np.arange(n), rep.astype(int))
    if 0 < y[idx].sum() < len(idx):
        assert M.weighted_auroc(y, s, rep[None])[0] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_absent_class_and_nan_labels():
    assert np.isnan(M.auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert np.isnan(M.auprc([0, 0], [0.1, 0.2]))
    y = np.array([1, 0, np.nan, 1, 0])
    s = np.array([0.9, 0.1, 0.5, 0.8, 0.2])
    assert M.auroc(y, s) == 1.0


def _miscalibrated(n, rng, temp=3.0, shift=-1.0):
    z = rng.normal(0, 2, n)  # true logit
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return y, z * temp + shift  # an over-confident, shifted model


def test_calibration_reduces_ece_on_held_out_data():
    rng = np.random.default_rng(0)
    y_val, l_val = _miscalibrated(3000, rng)
    y_te, l_te = _miscalibrated(3000, rng)
    raw = 1 / (1 + np.exp(-l_te))
    # truly calibrated probabilities have a small ECE; these raw ones a large one
    z = rng.normal(0, 2, 5000)
    p_true = 1 / (1 + np.exp(-z))
    assert M.ece((rng.random(5000) < p_true).astype(float), p_true) < 0.03
    assert M.ece(y_te, raw) > 0.08
    for scaler in (cal.PlattScaler(), cal.TemperatureScaler()):
        scaler.fit(l_val[:, None], y_val[:, None])
        p = scaler.transform(l_te[:, None])[:, 0]
        assert M.ece(y_te, p) < M.ece(y_te, raw)
        assert M.brier(y_te, p) < M.brier(y_te, raw)
        again = type(scaler).from_dict(scaler.to_dict()).transform(l_te[:, None])[:, 0]
        np.testing.assert_allclose(again, p)
    platt = cal.PlattScaler().fit(l_val[:, None], y_val[:, None])
    assert M.ece(y_te, platt.transform(l_te[:, None])[:, 0]) < 0.03
    assert platt.a[0] == pytest.approx(1 / 3, rel=0.15) and platt.b[0] == pytest.approx(1 / 3, abs=0.15)


def test_calibration_without_both_classes_is_identity():
    z = np.array([[-1.0, 2.0], [0.5, 1.0], [2.0, -3.0]])
    y = np.array([[0, 1], [0, 1], [0, 1]], float)
    for s in (cal.PlattScaler().fit(z, y), cal.TemperatureScaler().fit(z, y)):
        np.testing.assert_allclose(s.transform(z), 1 / (1 + np.exp(-z)))


def _binormal(n_pos, n_neg, d, rng):
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return y, s


def test_patient_bootstrap_covers_the_true_auroc():
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(1)
    hits, n_sets = 0, 120
    for k in range(n_sets):
        y, s = _binormal(60, 140, d, rng)
        groups = np.arange(len(y)) // 2  # two studies per patient
        ci = M.bootstrap_ci(y, s, groups, n=400, seed=k)
        hits += ci["low"] <= truth <= ci["high"]
    assert 0.88 <= hits / n_sets <= 0.99


def test_multilabel_and_paired_bootstrap():
    rng = np.random.default_rng(2)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(float)
    good = y + rng.normal(0, 0.6, y.shape)
    bad = y + rng.normal(0, 2.0, y.shape)
    groups = np.arange(n)
    res = M.bootstrap_ci_multilabel(y, good, groups, n=300)
    assert res["macro"]["low"] <= res["macro"]["estimate"] <= res["macro"]["high"]
    assert res["macro"]["estimate"] == pytest.approx(np.mean([roc_auc_score(y[:, j], good[:, j]) for j in range(3)]))
    d = M.paired_bootstrap(y, good, bad, groups, n=300)
    assert d["low"] > 0 and d["p_value"] < 0.01
    other = y + rng.normal(0, 0.6, y.shape)  # equally good: no difference
    d0 = M.paired_bootstrap(y, good, other, groups, n=300)
    assert d0["low"] < 0 < d0["high"] and d0["p_value"] > 0.05


def test_joint_macro_bootstrap_draws_a_patients_studies_together():
    """CT and MRI parts that share patients: each part's interval is the one-part bootstrap's, and
    the mean's resamples pair the parts by patient (two identical parts: the mean's interval is the
    part's own; drawn independently it would be narrower)."""
    rng = np.random.default_rng(7)
    n = 160
    pats = np.array([f"p{i // 2}" for i in range(n)])  # two studies per patient
    y = (rng.random((n, 2)) < 0.35).astype(float)
    s = y + rng.normal(0, 1.0, y.shape)
    twin = M.joint_macro_bootstrap({"CT": (y, s, pats), "MR": (y, s, pats)}, n=400, seed=3)
    one = M.bootstrap_ci_multilabel(y, s, pats, n=400, seed=3)["macro"]
    for part in ("CT", "MR", "mean"):
        assert (twin[part]["estimate"], twin[part]["low"], twin[part]["high"]) == pytest.approx(
            (one["estimate"], one["low"], one["high"]))
    # two different parts: estimates are the sklearn macros and their mean; only the shared patients tie them
    y2 = (rng.random((60, 3)) < 0.4).astype(float)
    s2 = y2 + rng.normal(0, 0.7, y2.shape)
    p2 = np.concatenate([pats[:40:2], [f"q{i}" for i in range(40)]])  # 20 patients also in the first part
    r = M.joint_macro_bootstrap({"CT": (y, s, pats), "MR": (y2, s2, p2)}, n=400, seed=3)
    ct = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)])
    mr = np.mean([roc_auc_score(y2[:, j], s2[:, j]) for j in range(3)])
    assert (r["CT"]["estimate"], r["MR"]["estimate"], r["mean"]["estimate"]) == pytest.approx((ct, mr, (ct + mr) / 2))
    for part in ("CT", "MR", "mean"):
        assert r[part]["low"] < r[part]["estimate"] < r[part]["high"] and r[part]["resamples"] == 400
    w = M.patient_weights(np.concatenate([pats, p2]), 400, 3)  # the MRI part reads its own studies' weights
    mr_samples = np.nanmean(M._per_label_samples(y2, s2, w[:, n:], M.auroc), axis=1)
    assert (r["MR"]["low"], r["MR"]["high"]) == pytest.approx(tuple(np.quantile(mr_samples, [0.025, 0.975])))
    with pytest.raises(ValueError):
        M.joint_macro_bootstrap({})
    with pytest.raises(ValueError, match="part 'MR' needs labels, scores and patients"):
        M.joint_macro_bootstrap({"CT": (y, s, pats), "MR": (y2, s2, p2[:-1])})
    with pytest.raises(ValueError, match="part 'MR'"):
        M.joint_macro_bootstrap({"CT": (y, s, pats), "MR": (y2[:0], s2[:0], p2[:0])})


def test_replicate_paired_bootstrap_averages_seeds_on_shared_resamples():
    rng = np.random.default_rng(5)
    n = 240
    y = (rng.random((n, 2)) < 0.35).astype(float)
    groups = np.repeat(np.arange(n // 2), 2)  # two studies per patient
    a = [y + rng.normal(0, sd, y.shape) for sd in (0.5, 0.7, 0.9)]  # three "seeds", all informative
    b = [y + rng.normal(0, 3.0, y.shape) for _ in range(3)]
    r = M.replicate_paired_bootstrap(y, a, b, groups, n=400, seed=1)
    macro = [np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)]) for s in a]
    assert r["a_replicates"] == pytest.approx(macro)
    assert r["a"] == pytest.approx(np.mean(macro))
    assert r["estimate"] == pytest.approx(r["a"] - r["b"])
    assert r["low"] > 0 and r["p_value"] < 0.01
    # one replicate each is the plain paired bootstrap, bit for bit
    one = M.replicate_paired_bootstrap(y, a[:1], b[:1], groups, n=400, seed=1)
    plain = M.paired_bootstrap(y, a[0], b[0], groups, n=400, seed=1)
    assert one == plain and "a_replicates" not in plain
    # averaging over seeds narrows the interval that one seed's test-sample noise gives
    single = [M.paired_bootstrap(y, x, z, groups, n=400, seed=1) for x, z in zip(a, b)]
    assert r["high"] - r["low"] < max(s["high"] - s["low"] for s in single)
    with pytest.raises(ValueError):
        M.replicate_paired_bootstrap(y, [], b, groups)
    # seed i of A is paired with seed i of B: Student's t over the three differences, checked with scipy
    diffs = np.subtract(macro, [np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)]) for s in b])
    t = r["replicate_t"]
    assert t["differences"] == pytest.approx(diffs) and t["df"] == 2
    lo, hi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (t["low"], t["high"]) == pytest.approx((lo, hi))
    assert "replicate_t" not in M.replicate_paired_bootstrap(y, a, b[:2], groups, n=50)  # unpaired counts


def test_replicate_t_carries_the_seed_spread_the_patient_bootstrap_leaves_out():
    """One good and two poor A seeds against steady B seeds: on a large test set the patient
    bootstrap of the seed mean is tight and excludes zero, while the seeds disagree on the sign."""
    rng = np.random.default_rng(11)
    n = 2000
    y = (rng.random((n, 2)) < 0.4).astype(float)
    groups = np.arange(n)
    a = [y + rng.normal(0, sd, y.shape) for sd in (0.3, 1.5, 1.5)]
    b = [y + rng.normal(0, 1.0, y.shape) for _ in range(3)]
    r = M.replicate_paired_bootstrap(y, a, b, groups, n=200, seed=0)
    d = r["replicate_t"]["differences"]
    assert max(d) > 0 > min(d)  # the seeds disagree on which model is better
    assert not (r["low"] <= 0 <= r["high"])  # the patient bootstrap alone calls a difference
    assert r["replicate_t"]["low"] < 0 < r["replicate_t"]["high"]  # the seed-level interval does not
    with pytest.raises(ValueError, match="at least two"):
        M.replicate_t_interval([0.1, float("nan")])
    assert M.replication_verdict(r) == "no evidence"  # the rule needs both intervals


@pytest.mark.parametrize("boot, t, verdict", [
    ((0.01, 0.05), (0.002, 0.08), "A better"),
    ((-0.05, -0.01), (-0.08, -0.001), "A worse"),
    ((0.01, 0.05), (-0.02, 0.08), "no evidence"),   # seeds disagree although the test sample does not
    ((-0.01, 0.05), (0.01, 0.08), "no evidence"),   # the test sample is too small although the seeds agree
    ((0.01, 0.05), (-0.05, -0.01), "no evidence"),  # contradictory intervals
    ((0.01, 0.05), None, "not replicated"),
    ((float("nan"), float("nan")), (0.01, 0.02), "no evidence"),
])
def test_replication_verdict_needs_both_intervals_on_one_side(boot, t, verdict):
    res = {"estimate": 0.0, "low": boot[0], "high": boot[1]}
    if t is not None:
        res["replicate_t"] = {"low": t[0], "high": t[1]}
    assert M.replication_verdict(res) == verdict


def test_replication_verdict_on_consistent_seeds():
    """Three A seeds all better than their B twins on a large test set: both intervals above zero."""
    rng = np.random.default_rng(5)
    y = (rng.random((1500, 2)) < 0.4).astype(float)
    a = [y + rng.normal(0, 0.6, y.shape) for _ in range(3)]
    b = [y + rng.normal(0, 1.2, y.shape) for _ in range(3)]
    r = M.replicate_paired_bootstrap(y, a, b, np.arange(len(y)), n=200, seed=0)
    assert M.replication_verdict(r) == "A better"
    assert M.replication_verdict(M.replicate_paired_bootstrap(y, b, a, np.arange(len(y)), n=200, seed=0)) == "A worse"


def test_operating_points_and_triage():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], float)
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.1, 0.05, 0.0])
    t = cal.threshold_for_sensitivity(y, p, 0.75)
    assert t == 0.7
    st = cal.operating_stats(y, p, t)
    assert st["sensitivity"] == 0.75 and st["specificity"] == 1.0 and st["flag_rate"] == pytest.approx(0.3)
    t = cal.threshold_for_sensitivity(y, p, 1.0)
    st = cal.operating_stats(y, p, t)
    assert t == 0.2 and st["sensitivity"] == 1.0 and st["specificity"] == pytest.approx(4 / 6)
    assert st["flag_rate"] == pytest.approx(0.6) and st["ppv"] == pytest.approx(4 / 6)
    assert cal.threshold_for_sensitivity(np.zeros(4), np.ones(4), 0.9) == float("inf")
    assert np.mean(p >= cal.threshold_for_flag_rate(p, 0.3)) == pytest.approx(0.3)
    labels = ["hem", "atrophy", "normal_variant"]
    acuity = {"hem": "Urgent", "atrophy": "Routine", "normal_variant": "Normal"}
    probs = np.array([[0.9, 0.9, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.9], [0.1, 0.1, 0.1]])
    thr = {"hem": 0.5, "atrophy": 0.5, "normal_variant": 0.5}
    assert cal.triage_levels(probs, labels, thr, acuity) == ["Urgent", "Routine", "Normal", "Normal"]
    np.testing.assert_allclose(cal.urgent_score(probs, labels, acuity), probs[:, 0])


def test_ece_floor_is_what_a_perfectly_calibrated_model_scores():
    """On labels drawn from the predictions themselves, the plug-in ECE averages the null floor,
    the debiased squared error averages ~0 and the calibration test rejects ~5 % of the time;
    labels drawn from shifted probabilities are flagged."""
    rng = np.random.default_rng(3)
    n = 80
    p = rng.uniform(0.15, 0.65, n)
    eces, sq, rejected = [], [], []
    for s in range(150):
        y = (rng.random(n) < p).astype(float)
        c = M.calibration_check(y, p, n=400, seed=s)
        eces.append(c["ece"])
        sq.append(c["squared_ce_debiased"])
        rejected.append(c["p_value"] < 0.05)
    floor = M.ece_null(p, n=4000, seed=0).mean()
    assert 0.10 < floor < 0.18  # ~sqrt(10 p(1-p) / 80): far above a 0.05 target
    assert abs(np.mean(eces) - floor) < 0.01
    sq += [M.debiased_squared_ce((rng.random(n) < p).astype(float), p) for _ in range(1000)]
    assert abs(np.mean(sq)) < 0.0015  # unbiased (SE ~0.0004); the plug-in square is ~floor^2 ~ 0.02
    assert np.mean(rejected) < 0.12
    shifted = [M.calibration_check((rng.random(n) < np.clip(p + 0.25, 0, 1)).astype(float), p, n=400, seed=s)
               for s in range(30)]
    assert np.mean([c["p_value"] < 0.05 for c in shifted]) > 0.8
    assert np.mean([c["rmsce_debiased"] for c in shifted]) == pytest.approx(0.25, abs=0.06)


def test_test_size_needed_for_an_ece_floor_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.2, 0.6, 200)
    n05 = M.studies_for_ece_floor(p, 0.05, seed=0)
    n10 = M.studies_for_ece_floor(p, 0.10, seed=0)
    assert 300 < n05 < 1200
    assert 2.8 < n05 / n10 < 5.5  # a floor twice as low needs about four times the studies
    assert M.ece_null(rng.choice(p, n05), n=2000, seed=1).mean() == pytest.approx(0.05, abs=0.008)


def test_shrunk_platt_falls_back_to_the_base_rate_only_when_validation_says_so():
    """A label whose logits carry nothing is pulled to its validation base rate (flat
    predictions, lower test ECE than plain Platt across repeats); a label the logits rank well
    keeps an almost unshrunk Platt fit; the saved map is an ordinary Platt map."""
    rng = np.random.default_rng(4)
    flat_ece, platt_ece, shrinks = [], [], []
    for rep in range(25):
        y_val = (rng.random(40) < 0.3).astype(float)
        y_te = (rng.random(3000) < 0.3).astype(float)
        l_val, l_te = rng.normal(1.0, 1.0, 40), rng.normal(1.0, 1.0, 3000)  # uninformative, shifted
        s = cal.ShrunkPlattScaler(seed=rep).fit(l_val[:, None], y_val[:, None])
        shrinks.append(s.shrink[0])
        flat_ece.append(M.ece(y_te, s.transform(l_te[:, None])[:, 0]))
        platt_ece.append(M.ece(y_te, cal.PlattScaler().fit(l_val[:, None], y_val[:, None]).transform(l_te[:, None])[:, 0]))
    assert np.median(shrinks) >= 0.3
    assert np.mean(flat_ece) < np.mean(platt_ece)
    y_val, l_val = _miscalibrated(400, rng)
    y_te, l_te = _miscalibrated(3000, rng)
    s = cal.ShrunkPlattScaler().fit(l_val[:, None], y_val[:, None])
    assert s.shrink[0] <= 0.1  # next to a Hessian of ~5 per unit slope: a negligible pull
    assert s.a[0] == pytest.approx(1 / 3, rel=0.25)
    p = s.transform(l_te[:, None])[:, 0]
    assert M.ece(y_te, p) < 0.04
    d = s.to_dict()
    assert d["kind"] == "platt" and d["shrink"] == [s.shrink[0]]
    back = cal.scaler_from_dict(d)
    assert isinstance(back, cal.ShrunkPlattScaler)  # a refit (external site) is done the same way
    np.testing.assert_allclose(back.transform(l_te[:, None])[:, 0], p)
    assert type(cal.scaler_from_dict(cal.PlattScaler().fit(l_val[:, None], y_val[:, None]).to_dict())) is cal.PlattScaler
    # reproducible (seeded folds), and labels without both classes stay the identity
    again = cal.ShrunkPlattScaler().fit(l_val[:, None], y_val[:, None])
    assert again.a[0] == s.a[0] and again.b[0] == s.b[0]
    one = cal.ShrunkPlattScaler().fit(np.array([[0.5], [1.0]]), np.array([[1.0], [1.0]]))
    assert one.a[0] == 1.0 and one.b[0] == 0.0


def test_platt_never_reverses_the_heads_ranking():
    """Validation scores anti-correlated with the labels (noise on a few dozen studies) must not
    flip the ranking: the slope stops at 0 and the probability is the base rate."""
    rng = np.random.default_rng(7)
    y = (rng.random(40) < 0.3).astype(float)
    z = -2.0 * y + rng.normal(0, 0.5, 40)  # anti-correlated
    for s in (cal.PlattScaler().fit(z[:, None], y[:, None]), cal.ShrunkPlattScaler().fit(z[:, None], y[:, None])):
        assert s.a[0] == 0.0
        p = s.transform(np.linspace(-3, 3, 7)[:, None])[:, 0]
        assert np.ptp(p) == 0 and abs(p[0] - y.mean()) < 0.05
    ok = cal.PlattScaler().fit(-z[:, None], y[:, None])  # the same data the right way round
    assert ok.a[0] > 0
