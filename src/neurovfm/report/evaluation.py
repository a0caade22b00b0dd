"""Evaluate structured findings reports against ground-truth findings.

A generated report can read fluently and still be wrong in the ways that matter clinically: it
may invent a finding, miss one (worst when the missed finding is urgent), put it on the wrong
side, or change the study's triage level. Text-overlap scores hide all of these, so reports are
scored here on their structured findings: each report finding is matched one-to-one with a
ground-truth finding of the same label, and the counts from every study are pooled into micro
precision / recall / F1 (F1 is the primary metric), a hallucination rate, a laterality error
rate, an urgent miss rate and triage accuracy. Intervals and the paired A-vs-B comparison
resample *patients* (:func:`neurovfm.eval.metrics.patient_weights`), as the other evaluations do.

Every rate whose denominator is zero (0/0: no reported findings, no matched pairs, no urgent
truth findings...) is ``NaN``, never 0: there was nothing to measure, which is not the same as a
perfect or a failing score.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..eval.metrics import _interval, patient_weights
from ..synth import tables

__all__ = [
    "COUNT_KEYS",
    "METRIC_RATIOS",
    "MatchResult",
    "bootstrap_metric_ci",
    "finding_is_urgent",
    "match_findings",
    "paired_f1_bootstrap",
    "paired_metric_bootstrap",
    "report_metrics",
    "safe_triage",
    "study_counts",
]

URGENT = "Urgent"
#: Default number of patient resamples, resampling seed and two-sided interval level.
N_RESAMPLES = 1000
SEED = 0
ALPHA = 0.05
#: Per-study numeric fields produced by :func:`study_counts` and summed by the metrics.
COUNT_KEYS: tuple[str, ...] = (
    "tp", "fp", "fn", "side_errors", "urgent_truth", "urgent_missed", "triage_correct",
    "n_reported", "n_truth",
)
_STUDY = "_study"  # pseudo-field: 1 per study (denominator of per-study rates)
#: Each pooled metric as (numerator, denominator), each a {count field: coefficient} sum.
METRIC_RATIOS: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "precision": ({"tp": 1}, {"tp": 1, "fp": 1}),
    "recall": ({"tp": 1}, {"tp": 1, "fn": 1}),
    "f1": ({"tp": 2}, {"tp": 2, "fp": 1, "fn": 1}),
    "hallucination_rate": ({"fp": 1}, {"tp": 1, "fp": 1}),
    "laterality_error_rate": ({"side_errors": 1}, {"tp": 1}),
    "urgent_miss_rate": ({"urgent_missed": 1}, {"urgent_truth": 1}),
    "triage_accuracy": ({"triage_correct": 1}, {_STUDY: 1}),
    "mean_reported_per_study": ({"n_reported": 1}, {_STUDY: 1}),
    "mean_truth_per_study": ({"n_truth": 1}, {_STUDY: 1}),
    "hallucinations_per_study": ({"fp": 1}, {_STUDY: 1}),
    "misses_per_study": ({"fn": 1}, {_STUDY: 1}),
}


# -- matching -------------------------------------------------------------------------------------
@dataclass
class MatchResult:
    """One-to-one matching of a report's findings with the truth findings of one study."""

    n_reported: int
    n_truth: int
    n_matched: int
    n_side_errors: int
    hallucinated: list[dict] = field(default_factory=list)
    missed: list[dict] = field(default_factory=list)
    pairs: list[tuple[dict, dict]] = field(default_factory=list)  # (report, truth)


def _side(finding: Mapping) -> str | None:
    side = finding.get("side")
    return None if side is None else str(side).lower()


def _sides_differ(a: Mapping, b: Mapping) -> bool:
    """True when both findings state a side and the sides differ (unknown side: no error)."""
    sa, sb = _side(a), _side(b)
    return sa is not None and sb is not None and sa != sb


def _match_label(rep: list[dict], tru: list[dict]) -> list[tuple[int, int]]:
    """Index pairs for one label: side-agreeing pairs first (this maximises them), then the rest."""
    free_t = list(range(len(tru)))
    pairs: list[tuple[int, int]] = []
    unpaired_r: list[int] = []
    for i, r in enumerate(rep):
        j = next((j for j in free_t if _side(tru[j]) == _side(r)), None)
        if j is None:
            unpaired_r.append(i)
        else:
            pairs.append((i, j))
            free_t.remove(j)
    pairs.extend(zip(unpaired_r, free_t))
    return pairs


def _by_label(findings: Iterable[Mapping]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in findings:
        out.setdefault(str(f["label"]), []).append(dict(f))
    return out


def match_findings(report_findings: Sequence[Mapping], truth_findings: Sequence[Mapping]) -> MatchResult:
    """Match report findings to truth findings one-to-one by label.

    Each finding matches at most one finding of the same label on the other side; where a label
    occurs several times, pairs whose sides agree are preferred. A matched pair is a side error
    when both sides are stated and differ.
    """
    rep, tru = _by_label(report_findings), _by_label(truth_findings)
    pairs: list[tuple[dict, dict]] = []
    hallucinated: list[dict] = []
    missed: list[dict] = []
    for label in list(dict.fromkeys([*rep, *tru])):
        r, t = rep.get(label, []), tru.get(label, [])
        got = _match_label(r, t)
        pairs.extend((r[i], t[j]) for i, j in got)
        used_r, used_t = {i for i, _ in got}, {j for _, j in got}
        hallucinated.extend(x for i, x in enumerate(r) if i not in used_r)
        missed.extend(x for j, x in enumerate(t) if j not in used_t)
    return MatchResult(
        n_reported=len(report_findings), n_truth=len(truth_findings), n_matched=len(pairs),
        n_side_errors=sum(_sides_differ(a, b) for a, b in pairs),
        hallucinated=hallucinated, missed=missed, pairs=pairs,
    )


# -- per-study counts -----------------------------------------------------------------------------
def safe_triage(modality: str, labels: Iterable[str]) -> str:
    """:func:`tables.triage` of ``labels``, ignoring labels the modality's table does not know."""
    mod = tables.normalize_modality(modality)
    known = set(tables.label_names(mod))
    return tables.triage(mod, [lab for lab in labels if lab in known])


def finding_is_urgent(finding: Mapping, modality: str) -> bool:
    """Urgent by the finding's own ``acuity`` if given, else by the label table (unknown: no)."""
    level = finding.get("acuity")
    if level is None:
        try:
            level = tables.acuity(modality, str(finding["label"]))
        except ValueError:
            return False
    return level == URGENT


def study_counts(report: Mapping, truth_record: Mapping) -> dict[str, Any]:
    """Counts of one study's report against its truth record (one ``findings_keyed`` line).

    ``triage_pred`` is the triage of the reported labels for the truth's modality (unknown labels
    ignored); ``triage_true`` is the record's ``triage`` if present, else computed the same way.
    """
    modality = str(truth_record["modality"])
    rep = list(report.get("findings") or [])
    tru = list(truth_record.get("findings") or [])
    m = match_findings(rep, tru)
    pred = safe_triage(modality, (str(f["label"]) for f in rep))
    true = truth_record.get("triage") or safe_triage(modality, (str(f["label"]) for f in tru))
    return {
        "study_key": truth_record.get("study_key"),
        "tp": m.n_matched, "fp": len(m.hallucinated), "fn": len(m.missed),
        "side_errors": m.n_side_errors,
        "urgent_truth": sum(finding_is_urgent(f, modality) for f in tru),
        "urgent_missed": sum(finding_is_urgent(f, modality) for f in m.missed),
        "triage_pred": pred, "triage_true": true, "triage_correct": int(pred == true),
        "n_reported": m.n_reported, "n_truth": m.n_truth,
    }


# -- pooled metrics -------------------------------------------------------------------------------
def _count_matrix(counts: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """{field: [N] float array} of the per-study counts, plus the per-study pseudo-field."""
    out = {k: np.array([float(c[k]) for c in counts], np.float64) for k in COUNT_KEYS}
    out[_STUDY] = np.ones(len(counts), np.float64)
    return out


def _ratio(sums: Mapping[str, np.ndarray | float], key: str) -> np.ndarray:
    """Metric ``key`` from summed counts (scalars or [B] arrays); 0/0 is NaN."""
    num_c, den_c = METRIC_RATIOS[key]
    num = sum(c * np.asarray(sums[k], np.float64) for k, c in num_c.items())
    den = sum(c * np.asarray(sums[k], np.float64) for k, c in den_c.items())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def report_metrics(counts: Sequence[Mapping]) -> dict[str, Any]:
    """Pooled (micro) metrics over studies: every key of :data:`METRIC_RATIOS` plus totals.

    F1 is the primary metric. Any 0/0 rate is NaN (nothing to measure), not 0.
    """
    mat = _count_matrix(counts)
    sums = {k: float(v.sum()) for k, v in mat.items()}
    out: dict[str, Any] = {key: float(_ratio(sums, key)) for key in METRIC_RATIOS}
    out["n_studies"] = len(counts)
    out.update({f"total_{k}": int(sums[k]) for k in COUNT_KEYS})
    return out


# -- patient bootstrap ----------------------------------------------------------------------------
def _resampled(counts: Sequence[Mapping], w: np.ndarray, key: str) -> np.ndarray:
    """[B] metric ``key`` under each row of patient weights ``w`` [B, N]."""
    mat = _count_matrix(counts)
    return _ratio({k: w @ v for k, v in mat.items()}, key)


def _check_key(key: str) -> None:
    if key not in METRIC_RATIOS:
        raise ValueError(f"unknown report metric {key!r}: expected one of {', '.join(METRIC_RATIOS)}")


def bootstrap_metric_ci(counts: Sequence[Mapping], groups: Sequence, key: str = "f1",
                        n: int = N_RESAMPLES, seed: int = SEED, alpha: float = ALPHA) -> dict[str, Any]:
    """Estimate and percentile interval of one pooled metric, resampling patients (``groups``)."""
    _check_key(key)
    if len(groups) != len(counts):
        raise ValueError(f"{len(groups)} groups for {len(counts)} studies")
    est = float(report_metrics(counts)[key])
    return _interval(est, _resampled(counts, patient_weights(groups, n, seed), key), alpha)


def paired_metric_bootstrap(counts_a: Sequence[Mapping], counts_b: Sequence[Mapping], groups: Sequence,
                            key: str = "f1", n: int = N_RESAMPLES, seed: int = SEED,
                            alpha: float = ALPHA) -> dict[str, Any]:
    """Metric(A) - metric(B) on the same patient resamples: estimate, interval, two-sided p-value.

    ``counts_a[i]`` and ``counts_b[i]`` must be the same study; the p-value is
    ``2 (k + 1) / (B + 1)`` with ``k`` the resamples on the smaller side of zero, as in
    :func:`neurovfm.eval.metrics.paired_bootstrap`.
    """
    _check_key(key)
    if not len(counts_a) == len(counts_b) == len(groups):
        raise ValueError(f"paired counts need equal lengths: {len(counts_a)}, {len(counts_b)}, {len(groups)} groups")
    w = patient_weights(groups, n, seed)
    ea, eb = float(report_metrics(counts_a)[key]), float(report_metrics(counts_b)[key])
    d = _resampled(counts_a, w, key) - _resampled(counts_b, w, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _interval(ea - eb, d, alpha)
    ok = d[np.isfinite(d)]
    if len(ok):
        k = min(int((ok <= 0).sum()), int((ok >= 0).sum()))
        res["p_value"] = float(min(1.0, 2 * (k + 1) / (len(ok) + 1)))
    else:
        res["p_value"] = float("nan")
    res["a"], res["b"], res["metric"] = ea, eb, key
    return res


def paired_f1_bootstrap(counts_a: Sequence[Mapping], counts_b: Sequence[Mapping], groups: Sequence,
                        n: int = N_RESAMPLES, seed: int = SEED, alpha: float = ALPHA) -> dict[str, Any]:
    """Micro F1(A) - F1(B) on the same patient resamples (see :func:`paired_metric_bootstrap`)."""
    return paired_metric_bootstrap(counts_a, counts_b, groups, "f1", n, seed, alpha)
