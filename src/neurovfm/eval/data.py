"""The study table an evaluation runs on: keyed labels joined with the features and the cache's
allowlisted series metadata (site, kernel, slice thickness, plane, age, sex) for breakdowns.

Labels come from a keyed ``labels.csv`` (``neurovfm rekey``): ``study_key``, ``patient_key``,
``split``, ``modality`` and one 0/1 column per label; an empty cell means "not applicable /
unknown" and is kept as NaN, never read as negative. Splits are by patient, and every
bootstrap resamples patients.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np

from neurovfm.errors import NeuroVFMError
from neurovfm.synth import tables

SPLITS = ("train", "val", "test")
REQUIRED = ("study_key", "patient_key", "split", "modality")


class LabelTableError(NeuroVFMError):
    """A labels file is missing, lacks a column, or does not join with the features."""


@dataclass
class StudyTable:
    """One modality's studies, in a fixed order, with labels [N, C] (NaN = unknown)."""

    modality: str
    labels: list[str]
    study_keys: list[str]
    patients: np.ndarray
    splits: np.ndarray
    y: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def subset(self, idx: np.ndarray) -> "StudyTable":
        return StudyTable(self.modality, self.labels, [self.study_keys[i] for i in idx], self.patients[idx],
                          self.splits[idx], self.y[idx], {k: v[idx] for k, v in self.meta.items()})

    def positives(self, split: str) -> np.ndarray:
        return np.nansum(self.y[self.index(split)], axis=0).astype(int)


def read_label_names(path: str) -> list[str]:
    """Label names from a one-column text/CSV file (one per line; a ``label`` header is skipped)."""
    if not os.path.isfile(path):
        raise LabelTableError(f"{path}: label list not found")
    with open(path) as fh:
        names = [ln.strip().split(",")[0] for ln in fh if ln.strip() and not ln.startswith("#")]
    return [n for n in names if n != "label"]


def read_study_table(labels_csv: str, modality: str, label_names: list[str] | None = None,
                     studies: set[str] | None = None) -> StudyTable:
    """Rows of ``modality`` (and, if given, only ``studies``), with the modality's label columns."""
    modality = tables.normalize_modality(modality)
    if not os.path.isfile(labels_csv):
        raise LabelTableError(f"{labels_csv}: labels file not found (a keyed labels.csv from `neurovfm rekey`)")
    with open(labels_csv, newline="") as fh:
        r = csv.DictReader(fh)
        cols = r.fieldnames or []
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise LabelTableError(f"{labels_csv}: missing column(s) {missing}")
        rows = [row for row in r if tables.normalize_modality(row["modality"]) == modality]
    names = label_names if label_names is not None else [n for n in tables.label_names(modality) if n in cols]
    absent = [n for n in names if n not in cols]
    if absent:
        raise LabelTableError(f"{labels_csv}: no column for label(s) {absent[:5]}")
    if studies is not None:
        rows = [row for row in rows if row["study_key"] in studies]
    rows.sort(key=lambda row: row["study_key"])
    if not rows:
        raise LabelTableError(f"{labels_csv}: no {modality} studies" + (" that have features" if studies else ""))
    bad = sorted({row["split"] for row in rows} - set(SPLITS))
    if bad:
        raise LabelTableError(f"{labels_csv}: unknown split(s) {bad}; expected {SPLITS}")
    y = np.full((len(rows), len(names)), np.nan, np.float32)
    for i, row in enumerate(rows):
        for j, n in enumerate(names):
            v = (row.get(n) or "").strip()
            if v in ("0", "1", "0.0", "1.0"):
                y[i, j] = float(v)
            elif v:
                raise LabelTableError(f"{labels_csv}: study {row['study_key'][:12]}…, label {n}: value {v!r} is not 0/1")
    meta = {}
    for col in ("site", "sex", "age"):
        if col in cols:
            meta[col] = np.array([row[col] for row in rows], dtype=object)
    return StudyTable(modality, list(names), [row["study_key"] for row in rows],
                      np.array([row["patient_key"] for row in rows], dtype=object),
                      np.array([row["split"] for row in rows], dtype=object), y, meta)


def add_series_meta(table: StudyTable, cache_dir: str) -> None:
    """Per-study kernel, slice thickness band, plane (from the cache's allowlisted metadata)."""
    from neurovfm.tokens.cache import TokenCache

    c = TokenCache(cache_dir)
    try:
        by: dict[str, list] = {}
        for e in c.series():
            by.setdefault(e.study_key, []).append(e)
    finally:
        c.close()
    kern, thick, plane = [], [], []
    for k in table.study_keys:
        es = by.get(k, [])
        ks = sorted({str(e.kernel) for e in es if e.kernel})
        kern.append("+".join(ks) if ks else "n/a")
        th = [float(e.slice_thickness_mm) for e in es if e.slice_thickness_mm]
        if not th:
            sp = [json.loads(e.source_spacing)[2] for e in es if e.source_spacing]
            th = [float(s) for s in sp]
        t = min(th) if th else float("nan")
        thick.append("n/a" if not np.isfinite(t) else ("<=1.5 mm" if t <= 1.5 else "1.5-3 mm" if t <= 3 else ">3 mm"))
        pl = sorted({str(e.plane) for e in es if e.plane})
        plane.append(pl[0] if len(pl) == 1 else ("mixed" if pl else "n/a"))
    table.meta["kernel"] = np.array(kern, dtype=object)
    table.meta["thickness"] = np.array(thick, dtype=object)
    table.meta["plane"] = np.array(plane, dtype=object)
    if "age" in table.meta:
        ages = np.array([float(a) if str(a).strip() else np.nan for a in table.meta["age"]])
        table.meta["age_band"] = np.array(["n/a" if not np.isfinite(a) else "<40" if a < 40 else "40-64" if a < 65
                                           else ">=65" for a in ages], dtype=object)
