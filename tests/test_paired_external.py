"""bench/eval/paired_external.py: two evaluate-external runs on the same studies, paired by patient."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "eval", "paired_external.py")
LABELS = ["a", "b", "c"]


def _run_folder(folder, keys, y, logits, headline=("a", "b")) -> str:
    os.makedirs(folder)
    np.savez(os.path.join(folder, "predictions_ct.npz"), study_keys=np.array(keys), labels=np.array(LABELS),
             logits=logits, y=y)
    with open(os.path.join(folder, "external.json"), "w") as fh:
        json.dump({"modalities": {"CT": {"headline_labels": list(headline), "macro_auroc": {"estimate": 0.0}}}}, fh)
    return str(folder)


def _setup(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    keys = [f"s{i}" for i in range(n)]
    y = (rng.random((n, 3)) < 0.4).astype(float)
    la = rng.normal(size=(n, 3)) + 0.5 * y
    lb = la.copy()
    lb[:, 0] = rng.normal(size=n) + 2.0 * y[:, 0]  # B better on label a, same on b
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_key", "patient_key"])
        w.writerows([(k, f"p{i // 2}") for i, k in enumerate(keys)])  # two studies per patient
    return keys, y, la, lb, str(labels_csv)


def _paired(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def test_difference_is_the_headline_macro_auroc_difference(tmp_path):
    keys, y, la, lb, labels = _setup(tmp_path)
    a = _run_folder(tmp_path / "a", keys, y, la)
    b = _run_folder(tmp_path / "b", keys, y, lb)
    out = tmp_path / "p.json"
    p = _paired(a, b, "--labels", labels, "--bootstrap", "200", "--out", str(out))
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())["modalities"]["CT"]
    want = np.mean([roc_auc_score(y[:, j], lb[:, j]) - roc_auc_score(y[:, j], la[:, j]) for j in (0, 1)])
    assert abs(d["b_minus_a"]["estimate"] - want) < 1e-9 and want > 0.1  # label c is not a headline label
    assert d["b_minus_a"]["low"] < want < d["b_minus_a"]["high"] and d["patients"] == 30


def test_runs_of_other_studies_or_labels_are_refused(tmp_path):
    keys, y, la, lb, labels = _setup(tmp_path)
    a = _run_folder(tmp_path / "a", keys, y, la)
    b = _run_folder(tmp_path / "b", keys[::-1], y, lb)
    p = _paired(a, b, "--labels", labels)
    assert p.returncode != 0 and "different studies" in p.stderr
    c = _run_folder(tmp_path / "c", keys, y, lb, headline=("a",))
    p = _paired(a, c, "--labels", labels)
    assert p.returncode != 0 and "headline labels" in p.stderr
    p = _paired(a, str(tmp_path / "nothing"), "--labels", labels)
    assert p.returncode != 0 and "no modality" in p.stderr
    p = _paired(a, b, "--labels", str(tmp_path / "no.csv"))
    assert p.returncode != 0 and "no.csv" in p.stderr and "Traceback" not in p.stderr
