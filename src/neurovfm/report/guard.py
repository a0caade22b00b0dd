"""A consistency guard between generated reports and the calibrated diagnostic head.

The language model writes fluent reports but can omit a finding the calibrated head is confident
about, or put a finding on the side opposite to where the head's attention map lies. The guard
compares the two: a confidently detected vocabulary label that the report omits is flagged (and
by default added, marked ``"added_by_guard"``), and a lateral side contradicting the head's map
side is flagged but left as written (the head's side comes from a saliency map and is the weaker
evidence). The guard's threshold is chosen on the validation split against ground truth
(:func:`choose_guard_threshold`), with a budget on false findings it may add per study, and its
effect is measured the same way (:func:`guard_effect`). :func:`template_report` is the baseline
a report generator has to beat: a report written from the head alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..synth import tables
from .evaluation import finding_is_urgent, match_findings

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_MAX_FALSE_PER_STUDY",
    "apply_guard",
    "choose_guard_threshold",
    "guard_effect",
    "template_report",
]

URGENT = "Urgent"
#: Side written when the head gives none (no lateralised map evidence).
FALLBACK_SIDE = "bilateral"
LATERAL_OPPOSITE = {"left": "right", "right": "left"}
TEMPLATE_DESCRIPTION = "reported from the diagnostic head"
GUARD_DESCRIPTION = "added by the consistency guard from the diagnostic head"
TEMPLATE_SIZE_MM = 0
NO_ACUTE_IMPRESSION = "No acute intracranial abnormality."
#: Thresholds tried by :func:`choose_guard_threshold` unless told otherwise.
DEFAULT_GRID: tuple[float, ...] = tuple(float(t) for t in np.round(np.linspace(0.05, 0.95, 19), 2)) + (0.99,)
#: Default budget: false findings the guard may add per validation study.
DEFAULT_MAX_FALSE_PER_STUDY = 0.1


# -- helpers --------------------------------------------------------------------------------------
def _prob(entry: Mapping) -> float:
    return float(entry["calibrated_probability"])


def _decided(entry: Mapping) -> bool:
    """The head's own decision (``calibrated_probability >= threshold`` where none is stored)."""
    if entry.get("decision") is not None:
        return bool(entry["decision"])
    return _prob(entry) >= float(entry["threshold"])


def _head_side(entry: Mapping) -> str | None:
    side = entry.get("side")
    return None if side is None else str(side).lower()


def _acuity(entry: Mapping, modality: str) -> str | None:
    """The head's stored acuity, else the table's; ``None`` for a label the table lacks."""
    if entry.get("acuity") is not None:
        return str(entry["acuity"])
    try:
        return tables.acuity(modality, str(entry["label"]))
    except ValueError:
        return None


def _threshold_for(label: str, threshold: float | Mapping[str, float]) -> float | None:
    """One threshold for every label, or the label's entry of a per-label dict (absent: unguarded)."""
    if isinstance(threshold, Mapping):
        t = threshold.get(label)
        return None if t is None else float(t)
    return float(threshold)


def _phrase(finding: Mapping) -> str:
    return f"{finding['side']} {str(finding['label']).replace('_', ' ')}"


# -- head-only template report --------------------------------------------------------------------
def template_report(head_labels: Sequence[Mapping], modality: str, vocabulary: Iterable[str],
                    exam_type: str) -> dict[str, Any]:
    """A structured report written from the calibrated head alone.

    One finding per ``vocabulary`` label the head decides positive, side from its map side
    (``"bilateral"`` where it has none), urgent findings first, then by probability.
    """
    vocab = set(vocabulary)
    chosen = [e for e in head_labels if e["label"] in vocab and _decided(e)]
    chosen.sort(key=lambda e: (_acuity(e, modality) != URGENT, -_prob(e), str(e["label"])))
    findings = [{"label": str(e["label"]), "side": _head_side(e) or FALLBACK_SIDE,
                 "size_mm": TEMPLATE_SIZE_MM, "description": TEMPLATE_DESCRIPTION} for e in chosen]
    urgent = [f for f, e in zip(findings, chosen) if _acuity(e, modality) == URGENT]
    impression = ("Urgent findings: " + ", ".join(_phrase(f) for f in urgent) + ".") if urgent \
        else NO_ACUTE_IMPRESSION
    return {"exam_type": exam_type, "findings": findings, "impression": impression}


# -- the guard ------------------------------------------------------------------------------------
def _side_flag(entry: Mapping, report_sides: set[str]) -> dict[str, Any] | None:
    """A side-disagreement flag when the head says left/right and the report only the opposite."""
    side = _head_side(entry)
    if side not in LATERAL_OPPOSITE:
        return None
    opposite = LATERAL_OPPOSITE[side]
    if opposite in report_sides and side not in report_sides and FALLBACK_SIDE not in report_sides:
        return {"kind": "side_disagreement", "label": str(entry["label"]), "probability": _prob(entry),
                "side": side, "report_side": opposite}
    return None


def apply_guard(report: Mapping, head_labels: Sequence[Mapping], vocabulary: Iterable[str],
                threshold: float | Mapping[str, float], add_missing: bool = True
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check a report against the head; return a guarded deep copy and the flags.

    * a vocabulary label with calibrated probability >= ``threshold`` (one float, or per label;
      labels absent from a dict are not guarded) that the report omits: flag
      ``omitted_finding`` and, with ``add_missing``, append it marked ``"added_by_guard": True``;
    * a reported label whose head map side is left/right while the report states only the
      opposite side: flag ``side_disagreement`` (the report's side is kept).

    The input is never modified. The copy carries ``"guard": {"threshold", "flags"}``.
    """
    new = copy.deepcopy(dict(report))
    new["findings"] = list(new.get("findings") or [])
    vocab = set(vocabulary)
    sides: dict[str, set[str]] = {}
    for f in new["findings"]:
        sides.setdefault(str(f["label"]), set()).add(str(f.get("side")).lower())
    flags: list[dict[str, Any]] = []
    for entry in head_labels:
        label = str(entry["label"])
        if label not in vocab:
            continue
        if label in sides:
            flag = _side_flag(entry, sides[label])
            if flag:
                flags.append(flag)
            continue
        t = _threshold_for(label, threshold)
        if t is None or _prob(entry) < t:
            continue
        side = _head_side(entry) or FALLBACK_SIDE
        flags.append({"kind": "omitted_finding", "label": label, "probability": _prob(entry), "side": side})
        if add_missing:
            new["findings"].append({"label": label, "side": side, "size_mm": TEMPLATE_SIZE_MM,
                                    "description": GUARD_DESCRIPTION, "added_by_guard": True})
    thr = dict(threshold) if isinstance(threshold, Mapping) else float(threshold)
    new["guard"] = {"threshold": thr, "flags": copy.deepcopy(flags)}
    return new, flags


# -- measured effect and threshold choice ---------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    """num / den, NaN for 0/0 (nothing to recover is not a recovery rate of 0)."""
    return float(num / den) if den else float("nan")


def guard_effect(raw_reports: Sequence[Mapping], guarded_reports: Sequence[Mapping],
                 truths: Sequence[Mapping]) -> dict[str, Any]:
    """What the guard's additions did, measured against ground truth.

    Truth findings the raw report missed are the ones the guard can recover; an added finding
    recovers one of them when labels match (one-to-one), otherwise it is a false addition.
    """
    if not len(raw_reports) == len(guarded_reports) == len(truths):
        raise ValueError("raw reports, guarded reports and truths must have equal lengths")
    tot = dict.fromkeys(("missing", "missing_urgent", "recovered", "recovered_urgent",
                         "added", "false_added", "recovered_side_errors"), 0)
    for raw, guarded, truth in zip(raw_reports, guarded_reports, truths):
        modality = str(truth["modality"])
        missed = match_findings(raw.get("findings") or [], truth.get("findings") or []).missed
        added = [f for f in guarded.get("findings") or [] if f.get("added_by_guard")]
        m = match_findings(added, missed)
        tot["missing"] += len(missed)
        tot["missing_urgent"] += sum(finding_is_urgent(f, modality) for f in missed)
        tot["recovered"] += m.n_matched
        tot["recovered_urgent"] += sum(finding_is_urgent(t, modality) for _, t in m.pairs)
        tot["added"] += len(added)
        tot["false_added"] += len(m.hallucinated)
        tot["recovered_side_errors"] += m.n_side_errors
    n = len(truths)
    out: dict[str, Any] = {"n_studies": n, **{f"n_{k}": v for k, v in tot.items()}}
    out["recovered_fraction"] = _ratio(tot["recovered"], tot["missing"])
    out["urgent_recovered_fraction"] = _ratio(tot["recovered_urgent"], tot["missing_urgent"])
    out["false_added_per_study"] = _ratio(tot["false_added"], n)
    return out


def _pick(table: list[dict[str, Any]], max_false_per_study: float) -> tuple[float, bool]:
    """(threshold, within budget): lowest in-budget threshold, else the fewest false additions."""
    ok = [r for r in table if r["false_added_per_study"] <= max_false_per_study]
    if ok:
        return min(r["threshold"] for r in ok), True
    best = min(r["false_added_per_study"] for r in table)
    return max(r["threshold"] for r in table if r["false_added_per_study"] == best), False


def choose_guard_threshold(val_reports: Sequence[Mapping], val_heads: Sequence[Sequence[Mapping]],
                           val_truths: Sequence[Mapping], vocabulary: Iterable[str],
                           grid: Iterable[float] | None = None,
                           max_false_per_study: float = DEFAULT_MAX_FALSE_PER_STUDY) -> dict[str, Any]:
    """Choose one guard threshold on the validation split.

    For each threshold in ``grid`` (default :data:`DEFAULT_GRID`) the guard is applied to every
    raw report and :func:`guard_effect` is measured. The lowest threshold (most recovery) whose
    false additions per study are within ``max_false_per_study`` wins; if none is, the threshold
    with the fewest false additions (the highest on ties).
    """
    if not len(val_reports) == len(val_heads) == len(val_truths) or not len(val_truths):
        raise ValueError("need equal, non-zero numbers of validation reports, head outputs and truths")
    vocab = list(vocabulary)
    thresholds = sorted({float(t) for t in (DEFAULT_GRID if grid is None else grid)})
    if not thresholds:
        raise ValueError("empty threshold grid")
    table = []
    for t in thresholds:
        guarded = [apply_guard(r, h, vocab, t)[0] for r, h in zip(val_reports, val_heads)]
        table.append({"threshold": t, **guard_effect(val_reports, guarded, val_truths)})
    chosen, within = _pick(table, max_false_per_study)
    rule = (f"lowest threshold with false additions per study <= {max_false_per_study:g} "
            f"on {len(val_truths)} validation studies"
            + ("" if within else "; none met the budget, so the threshold with the fewest false additions"))
    return {"threshold": chosen, "within_budget": within, "table": table, "rule": rule}
