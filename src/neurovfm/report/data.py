"""Report training and evaluation examples: frozen encoder features per series + ground truth.

Features come from ``neurovfm embed`` (one block of tokens per series view, reused rather than
recomputed); ground truth from the keyed ``findings_keyed.jsonl`` of ``neurovfm rekey``. The
target of a study is its structured report, written from the ground-truth findings in a fixed
order (urgent first, then by label) so the model never has to guess an arbitrary order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import NeuroVFMError
from ..probe.embed import FeatureStore
from ..synth import tables
from .schema import ReportSchema, clean_text, exam_type_for

ACUITY_ORDER = {"Urgent": 0, "Routine": 1, "Normal": 2}
MAX_IMPRESSION_ITEMS = 2
MAX_VIEWS = 8


class ReportDataError(NeuroVFMError):
    """Ground truth or features for report training are missing or inconsistent."""


@dataclass
class ReportExample:
    study_key: str
    patient_key: str
    split: str
    modality: str
    indication: str
    truth: dict[str, Any]          # the keyed ground-truth record
    views: list[Any]               # probe.embed.ViewFeatures, at most MAX_VIEWS


def read_truth(path: str) -> list[dict[str, Any]]:
    """Keyed ground-truth records (one JSON object per line, each with study_key and findings)."""
    if not os.path.isfile(path):
        raise ReportDataError(f"{path}: findings file not found (the keyed findings_keyed.jsonl of `neurovfm rekey`)")
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportDataError(f"{path}: line {n} is not JSON ({e.msg})") from None
            for k in ("study_key", "split", "modality", "findings"):
                if k not in rec:
                    raise ReportDataError(f"{path}: line {n} has no {k!r}")
            out.append(rec)
    return out


def finding_vocabulary(records: list[dict[str, Any]]) -> list[str]:
    """Every label of the label tables (CT and MRI); the report enum."""
    names = set(tables.label_names("CT")) | set(tables.label_names("MR"))
    extra = {f["label"] for r in records for f in r["findings"]} - names
    if extra:
        raise ReportDataError(f"findings use labels missing from the label tables: {sorted(extra)[:5]}")
    return sorted(names)


def target_report(rec: dict[str, Any], schema: ReportSchema) -> dict[str, Any]:
    """The structured report a study's ground truth implies."""
    fs = sorted(rec["findings"], key=lambda f: (ACUITY_ORDER.get(f.get("acuity", "Routine"), 1), f["label"]))
    findings, seen = [], set()
    for f in fs:     # one finding per (label, side), as the decoder allows
        side = f["side"] if f["side"] in schema.sides else "bilateral"
        if (f["label"], side) in seen or len(findings) == schema.max_findings:
            continue
        seen.add((f["label"], side))
        findings.append({"label": f["label"], "side": side, "size_mm": int(round(float(f.get("size_mm") or 0))),
                         "description": clean_text(f.get("location", ""))})
    imp = (rec.get("report") or {}).get("impression", "")
    items = [clean_text(line.split(".", 1)[1] if line[:1].isdigit() and "." in line else line)
             for line in imp.splitlines() if line.strip()]
    impression = " ".join(items[:MAX_IMPRESSION_ITEMS]) or "No acute intracranial abnormality."
    return {"exam_type": exam_type_for(rec["modality"]), "findings": findings, "impression": impression}


def build_examples(findings_path: str, features_dir: str, splits: tuple[str, ...] | None = None) -> list[ReportExample]:
    recs = read_truth(findings_path)
    store = FeatureStore(features_dir)
    out = []
    missing = 0
    for r in recs:
        if splits and r["split"] not in splits:
            continue
        views = store.by_study.get(r["study_key"])
        if not views:
            missing += 1
            continue
        out.append(ReportExample(r["study_key"], r.get("patient_key", r["study_key"]), r["split"], r["modality"],
                                 clean_text(r.get("indication") or ""), r, list(views)[:MAX_VIEWS]))
    if not out:
        raise ReportDataError(f"{findings_path} and {features_dir}: no study has both ground truth and features "
                              f"({missing} studies without features); were they keyed with the same secret?")
    out.sort(key=lambda e: e.study_key)
    return out


def subsample_tokens(feats: np.ndarray, max_tokens: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """float32 [n, D] with at most max_tokens rows: random when rng is given (training), evenly
    spaced otherwise (evaluation and `neurovfm report` see the same tokens)."""
    n = feats.shape[0]
    if n > max_tokens:
        idx = np.sort(rng.choice(n, max_tokens, replace=False)) if rng is not None else \
            np.linspace(0, n - 1, max_tokens).round().astype(np.int64)
        feats = feats[idx]
    return torch.from_numpy(np.asarray(feats, np.float32))


def series_features(ex: ReportExample, max_tokens: int, rng: np.random.Generator | None = None) -> list[torch.Tensor]:
    """One float32 [n, D] tensor per series view of a stored study (see subsample_tokens)."""
    return [subsample_tokens(v.feats, max_tokens, rng) for v in ex.views]
