"""Report evaluation against ground truth, the head consistency guard and the template report.

Every expected number below is worked out by hand from the small reports and truths built here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from neurovfm.report.evaluation import (
    bootstrap_metric_ci,
    match_findings,
    paired_f1_bootstrap,
    report_metrics,
    study_counts,
)
from neurovfm.report.guard import (
    DEFAULT_GRID,
    apply_guard,
    choose_guard_threshold,
    guard_effect,
    template_report,
)
from neurovfm.synth import tables

ASDH = "acute_subdural_hematoma"  # CT Urgent
EDH = "epidural_hematoma"  # CT Urgent
BGC = "basal_ganglia_calcification"  # CT Routine
COIL = "aneurysm_coil"  # CT Routine
CATH = "catheter"  # CT Routine
VOCAB = [ASDH, EDH, BGC, COIL]


def rf(label, side, size=5):
    """A report finding."""
    return {"label": label, "side": side, "size_mm": size, "description": "x"}


def tf(label, side, acuity=None):
    """A truth finding (acuity from the table unless given)."""
    return {"label": label, "side": side, "size_mm": 4.0,
            "acuity": acuity or tables.acuity("CT", label), "location": "somewhere"}


def report(*findings):
    return {"exam_type": "CT head", "findings": list(findings), "impression": "..."}


def truth(*findings, triage=None, key="s"):
    rec = {"study_key": key, "patient_key": "p", "split": "val", "modality": "CT",
           "indication": "", "findings": list(findings), "labels": [f["label"] for f in findings]}
    if triage is not None:
        rec["triage"] = triage
    return rec


def head(label, p, side=None, thr=0.5, decision=None, acuity=None):
    return {"label": label, "calibrated_probability": p, "threshold": thr,
            "decision": (p >= thr) if decision is None else decision,
            "acuity": acuity or tables.acuity("CT", label), "side": side, "side_shares": {}}


def test_label_acuities_used_here():
    assert [tables.acuity("CT", x) for x in (ASDH, EDH, BGC, COIL, CATH)] == \
        ["Urgent", "Urgent", "Routine", "Routine", "Routine"]


# -- matching and per-study counts --------------------------------------------------------------
def test_study_counts_hallucination_side_error_missed_urgent():
    rep = report(rf(ASDH, "left"), rf(BGC, "bilateral"), rf(CATH, "midline"))
    tru = truth(tf(ASDH, "left"), tf(EDH, "right"), tf(BGC, "left"), triage="Urgent")
    c = study_counts(rep, tru)
    assert (c["tp"], c["fp"], c["fn"], c["side_errors"]) == (2, 1, 1, 1)
    assert (c["urgent_truth"], c["urgent_missed"]) == (2, 1)
    assert (c["triage_pred"], c["triage_true"], c["triage_correct"]) == ("Urgent", "Urgent", 1)

    m = report_metrics([c])
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["laterality_error_rate"] == pytest.approx(1 / 2)
    assert m["urgent_miss_rate"] == pytest.approx(1 / 2)
    assert m["triage_accuracy"] == 1.0
    assert m["n_studies"] == 1


def test_match_lists_hallucinated_and_missed():
    m = match_findings([rf(ASDH, "left"), rf(CATH, "midline")], [tf(ASDH, "left"), tf(EDH, "right")])
    assert [f["label"] for f in m.hallucinated] == [CATH]
    assert [f["label"] for f in m.missed] == [EDH]
    assert (m.n_reported, m.n_truth, m.n_matched, m.n_side_errors) == (2, 2, 1, 0)
    assert [(a["label"], b["label"]) for a, b in m.pairs] == [(ASDH, ASDH)]


def test_duplicate_labels_matched_by_side():
    # in-order pairing would make two side errors; side-aware matching makes none
    m = match_findings([rf(ASDH, "right"), rf(ASDH, "left")], [tf(ASDH, "left"), tf(ASDH, "right")])
    assert (m.n_matched, m.n_side_errors) == (2, 0)
    assert sorted((a["side"], b["side"]) for a, b in m.pairs) == [("left", "left"), ("right", "right")]
    # three reported, one true: one match (the side-agreeing one), two hallucinated
    m = match_findings([rf(ASDH, "left"), rf(ASDH, "right"), rf(ASDH, "left")], [tf(ASDH, "right")])
    assert (m.n_matched, m.n_side_errors, len(m.hallucinated), len(m.missed)) == (1, 0, 2, 0)
    assert sorted(f["side"] for f in m.hallucinated) == ["left", "left"]
    # one side can only partly agree: left-left pairs, the remaining left-right is one error
    m = match_findings([rf(ASDH, "left"), rf(ASDH, "left")], [tf(ASDH, "right"), tf(ASDH, "left")])
    assert (m.n_matched, m.n_side_errors) == (2, 1)


def test_triage_wrong_when_urgent_missed_and_computed_when_absent():
    c = study_counts(report(rf(BGC, "bilateral")), truth(tf(ASDH, "right"), tf(BGC, "bilateral")))
    assert (c["triage_pred"], c["triage_true"], c["triage_correct"]) == ("Routine", "Urgent", 0)
    assert (c["urgent_truth"], c["urgent_missed"]) == (1, 1)
    assert report_metrics([c])["urgent_miss_rate"] == 1.0
    c = study_counts(report(), truth())
    assert (c["triage_pred"], c["triage_true"], c["triage_correct"]) == ("Normal", "Normal", 1)


def test_unknown_labels_do_not_crash():
    rep = report(rf("made_up_finding", "left"), rf(COIL, "right"))
    tru = {"modality": "CT", "findings": [{"label": "another_unknown", "side": "left"},
                                          {"label": "flagged_unknown", "side": "left", "acuity": "Urgent"}]}
    c = study_counts(rep, tru)
    assert c["triage_pred"] == "Routine"  # the unknown label is ignored, the coil is Routine
    assert c["triage_true"] == "Normal"  # no 'triage' key and no known truth label
    assert (c["tp"], c["fp"], c["fn"]) == (0, 2, 2)
    assert (c["urgent_truth"], c["urgent_missed"]) == (1, 1)  # only the one whose acuity says so
    assert study_counts(report(rf("made_up_finding", "left")), truth())["triage_pred"] == "Normal"


def test_zero_over_zero_is_nan():
    m = report_metrics([study_counts(report(), truth())])
    for key in ("precision", "recall", "f1", "hallucination_rate", "laterality_error_rate", "urgent_miss_rate"):
        assert math.isnan(m[key]), key
    assert m["triage_accuracy"] == 1.0
    # a report with findings but no truth: precision 0 (defined), recall NaN (nothing to find)
    m = report_metrics([study_counts(report(rf(CATH, "left")), truth())])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["hallucination_rate"] == 1.0
    assert math.isnan(m["recall"]) and math.isnan(m["laterality_error_rate"])
    empty = report_metrics([])
    assert empty["n_studies"] == 0 and math.isnan(empty["triage_accuracy"])


def test_metrics_pool_counts_micro():
    a = {"tp": 1, "fp": 0, "fn": 0, "side_errors": 0, "urgent_truth": 0, "urgent_missed": 0,
         "triage_correct": 1, "n_reported": 1, "n_truth": 1}
    b = {"tp": 0, "fp": 3, "fn": 1, "side_errors": 0, "urgent_truth": 1, "urgent_missed": 1,
         "triage_correct": 0, "n_reported": 3, "n_truth": 1}
    m = report_metrics([a, b])
    assert m["precision"] == pytest.approx(1 / 4)  # micro, not the mean of 1 and 0
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / (2 + 3 + 1))
    assert m["triage_accuracy"] == pytest.approx(0.5)
    assert m["hallucinations_per_study"] == pytest.approx(1.5)
    assert m["mean_reported_per_study"] == pytest.approx(2.0)


# -- bootstrap ------------------------------------------------------------------------------------
def _counts(tp, fp, fn):
    return {"tp": tp, "fp": fp, "fn": fn, "side_errors": 0, "urgent_truth": 0, "urgent_missed": 0,
            "triage_correct": 1, "n_reported": tp + fp, "n_truth": tp + fn}


def test_paired_bootstrap_a_better_on_every_study():
    n_st = 12
    a = [_counts(1 + i % 3, i % 2, (i + 1) % 2) for i in range(n_st)]
    b = [_counts(c["tp"], c["fp"] + 1, c["fn"] + 1) for c in a]  # same tp, strictly more errors
    groups = [f"p{i // 2}" for i in range(n_st)]  # two studies per patient
    tp, fp, fn = (sum(c[k] for c in a) for k in ("tp", "fp", "fn"))
    f1_a = 2 * tp / (2 * tp + fp + fn)
    f1_b = 2 * tp / (2 * tp + fp + fn + 2 * n_st)
    res = paired_f1_bootstrap(a, b, groups, n=300, seed=1)
    assert res["estimate"] == pytest.approx(f1_a - f1_b)
    assert (res["a"], res["b"]) == (pytest.approx(f1_a), pytest.approx(f1_b))
    assert 0 < res["low"] <= res["estimate"] <= res["high"]
    assert res["p_value"] == pytest.approx(2 / 301)
    assert res["resamples"] == 300
    # swapping the systems flips the sign
    rev = paired_f1_bootstrap(b, a, groups, n=300, seed=1)
    assert rev["estimate"] == pytest.approx(-res["estimate"]) and rev["high"] < 0


def test_paired_bootstrap_identical_systems():
    a = [_counts(1 + i % 3, i % 2, (i + 1) % 2) for i in range(8)]
    res = paired_f1_bootstrap(a, copy.deepcopy(a), [f"p{i}" for i in range(8)], n=200)
    assert res["estimate"] == 0.0 and res["low"] == 0.0 and res["high"] == 0.0
    assert res["p_value"] == 1.0


def test_bootstrap_metric_ci_resamples_patients():
    a = [_counts(3, 0, 0), _counts(0, 2, 2), _counts(2, 1, 0), _counts(1, 0, 3)]
    est = report_metrics(a)["f1"]
    # one patient: every resample draws that patient once, so the interval collapses
    one = bootstrap_metric_ci(a, ["p"] * 4, key="f1", n=100)
    assert one["estimate"] == pytest.approx(est)
    assert one["low"] == pytest.approx(est) and one["high"] == pytest.approx(est)
    # four patients with different studies: a real interval around the estimate
    four = bootstrap_metric_ci(a, ["a", "b", "c", "d"], key="f1", n=300)
    assert four["low"] < est < four["high"]
    prec = bootstrap_metric_ci(a, ["a", "b", "c", "d"], key="precision", n=50)
    assert prec["estimate"] == pytest.approx(6 / 9)
    with pytest.raises(ValueError):
        bootstrap_metric_ci(a, ["a"] * 4, key="no_such_metric")
    with pytest.raises(ValueError):
        paired_f1_bootstrap(a, a[:3], ["a"] * 4)


# -- guard ----------------------------------------------------------------------------------------
def _heads():
    return [head(ASDH, 0.9, "left"), head(EDH, 0.8, "right"), head(BGC, 0.97, None),
            head(CATH, 0.95, "left"), head(COIL, 0.3, "right")]


def test_guard_adds_omitted_and_flags_side_without_mutating():
    rep = report(rf(EDH, "left"))
    before = copy.deepcopy(rep)
    heads = _heads()
    new, flags = apply_guard(rep, heads, VOCAB, 0.6)
    assert rep == before  # input untouched
    kinds = [(f["kind"], f["label"]) for f in flags]
    assert kinds == [("omitted_finding", ASDH), ("side_disagreement", EDH), ("omitted_finding", BGC)]
    side_flag = flags[1]
    assert (side_flag["side"], side_flag["report_side"]) == ("right", "left")
    assert flags[0]["probability"] == 0.9 and flags[0]["side"] == "left"
    added = [f for f in new["findings"] if f.get("added_by_guard")]
    assert [(f["label"], f["side"]) for f in added] == [(ASDH, "left"), (BGC, "bilateral")]
    assert new["findings"][0] == before["findings"][0]  # the report's side is kept
    assert new["guard"]["threshold"] == 0.6 and new["guard"]["flags"] == flags
    # CATH is confident but not in the vocabulary; COIL is below threshold
    assert CATH not in {f["label"] for f in new["findings"]}
    assert COIL not in {f["label"] for f in new["findings"]}
    new["findings"][0]["side"] = "right"  # the copy is deep: editing it leaves the input alone
    assert rep == before


def test_guard_flag_only_and_per_label_thresholds():
    rep = report(rf(EDH, "left"))
    new, flags = apply_guard(rep, _heads(), VOCAB, 0.6, add_missing=False)
    assert len(flags) == 3 and new["findings"] == rep["findings"]
    thr = {ASDH: 0.95, BGC: 0.5}  # EDH and COIL absent: not guarded for omission
    new, flags = apply_guard(report(), _heads(), VOCAB, thr)
    assert [f["label"] for f in new["findings"]] == [BGC]
    assert new["guard"]["threshold"] == thr


def test_guard_no_side_flag_when_report_agrees_or_bilateral():
    heads = [head(EDH, 0.8, "right"), head(ASDH, 0.9, "midline")]
    for side in ("right", "bilateral"):
        _, flags = apply_guard(report(rf(EDH, side)), heads, VOCAB, 0.99)
        assert flags == []
    _, flags = apply_guard(report(rf(EDH, "left"), rf(EDH, "right")), heads, VOCAB, 0.99)
    assert flags == []  # the report also has the head's side
    _, flags = apply_guard(report(rf(ASDH, "left")), heads, VOCAB, 0.99)
    assert flags == []  # the head's side is not lateral


def test_guard_effect_against_truth():
    raw = [report(rf(ASDH, "left")), report()]
    truths = [truth(tf(ASDH, "left"), tf(EDH, "right"), tf(BGC, "left"), tf(CATH, "midline")), truth()]
    guarded = [copy.deepcopy(raw[0]), copy.deepcopy(raw[1])]
    guarded[0]["findings"] += [dict(rf(EDH, "right"), added_by_guard=True),
                               dict(rf(BGC, "left"), added_by_guard=True),
                               dict(rf(COIL, "left"), added_by_guard=True)]
    eff = guard_effect(raw, guarded, truths)
    assert (eff["n_missing"], eff["n_missing_urgent"]) == (3, 1)  # EDH (urgent), BGC, CATH
    assert (eff["n_recovered"], eff["n_recovered_urgent"]) == (2, 1)  # EDH, BGC
    assert (eff["n_added"], eff["n_false_added"]) == (3, 1)  # COIL is false
    assert eff["recovered_fraction"] == pytest.approx(2 / 3)
    assert eff["urgent_recovered_fraction"] == pytest.approx(1.0)
    assert eff["false_added_per_study"] == pytest.approx(0.5)
    none = guard_effect([report()], [report()], [truth()])
    assert math.isnan(none["recovered_fraction"]) and none["false_added_per_study"] == 0.0


def _val_set():
    reports = [report(), report(), report()]
    heads = [[head(ASDH, 0.8, "left")], [head(EDH, 0.4, "right")], [head(BGC, 0.6, "left")]]
    truths = [truth(tf(ASDH, "left")), truth(), truth()]
    return reports, heads, truths


def test_choose_threshold_respects_false_addition_budget():
    reports, heads, truths = _val_set()
    grid = [0.9, 0.3, 0.7, 0.5]
    # false additions per study: 0.3 -> 2/3, 0.5 -> 1/3, 0.7 -> 0, 0.9 -> 0; recovery 1 up to 0.7
    expect = {0.1: 0.7, 0.4: 0.5, 1.0: 0.3}
    for budget, thr in expect.items():
        res = choose_guard_threshold(reports, heads, truths, VOCAB, grid=grid, max_false_per_study=budget)
        assert res["threshold"] == thr and res["within_budget"], budget
    rows = {r["threshold"]: r for r in res["table"]}
    assert [r["threshold"] for r in res["table"]] == [0.3, 0.5, 0.7, 0.9]
    assert rows[0.5]["n_false_added"] == 1 and rows[0.5]["n_recovered"] == 1
    assert rows[0.5]["n_recovered_urgent"] == 1 and rows[0.9]["n_recovered"] == 0
    assert rows[0.3]["false_added_per_study"] == pytest.approx(2 / 3)
    # an impossible budget: fewest false additions (0 at 0.7 and 0.9), the higher one
    res = choose_guard_threshold(reports, heads, truths, VOCAB, grid=grid, max_false_per_study=-1)
    assert res["threshold"] == 0.9 and not res["within_budget"]
    assert "none met the budget" in res["rule"]


def test_default_grid():
    res = choose_guard_threshold(*_val_set(), VOCAB)
    assert [r["threshold"] for r in res["table"]] == list(DEFAULT_GRID)
    assert len(DEFAULT_GRID) == 20 and DEFAULT_GRID[0] == 0.05 and DEFAULT_GRID[-2:] == (0.95, 0.99)
    assert np.allclose(np.diff(DEFAULT_GRID[:-1]), 0.05)
    assert res["threshold"] == 0.65  # first grid value above the false BGC at 0.6


# -- template report ------------------------------------------------------------------------------
def test_template_report_decided_vocabulary_urgent_first():
    heads = _heads() + [{"label": COIL + "_x", "calibrated_probability": 0.99, "threshold": 0.5,
                         "decision": True, "acuity": "Routine", "side": "left"}]
    heads[4] = head(COIL, 0.6, "right", decision=False)  # the stored decision rules
    heads.append({"label": "arachnoid_cyst", "calibrated_probability": 0.7, "threshold": 0.5,
                  "side": None})  # no stored decision or acuity: p >= threshold, table acuity
    rep = template_report(heads, "CT", VOCAB + ["arachnoid_cyst"], "CT head without contrast")
    assert rep["exam_type"] == "CT head without contrast"
    assert [(f["label"], f["side"]) for f in rep["findings"]] == [
        (ASDH, "left"), (EDH, "right"), (BGC, "bilateral"), ("arachnoid_cyst", "bilateral")]
    assert all(f["size_mm"] == 0 and f["description"] == "reported from the diagnostic head"
               for f in rep["findings"])
    assert "acute subdural hematoma" in rep["impression"] and "epidural hematoma" in rep["impression"]
    assert "calcification" not in rep["impression"]
    calm = template_report([head(BGC, 0.9, "left"), head(ASDH, 0.2, "left")], "CT", VOCAB, "CT head")
    assert [f["label"] for f in calm["findings"]] == [BGC]
    assert calm["impression"] == "No acute intracranial abnormality."
    # the template scores against truth like any report
    c = study_counts(rep, truth(tf(ASDH, "left"), tf(EDH, "left")))
    assert (c["tp"], c["fp"], c["fn"], c["side_errors"]) == (2, 2, 0, 1)
