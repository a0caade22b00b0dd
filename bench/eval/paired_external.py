"""Two models scored by `neurovfm evaluate-external` on the same studies, paired: B's macro AUROC minus A's.

    python bench/eval/paired_external.py A_OUT B_OUT --labels KEYED/labels_keyed.csv [--out PAIRED.json]

A_OUT and B_OUT are `evaluate-external --out` folders (predictions_<mod>.npz + external.json) over
the same labels file; e.g. the shipped demo model's old heads on plain features and its new heads on
the features they were fitted on. Per modality present in both: the headline labels of A's run (the
same for B: same labels file and --min-test-positives, checked), the studies (checked equal), the
patient-resampled paired bootstrap of the evaluation (``eval.metrics.paired_bootstrap`` on the raw
logits: AUROC is rank-based), 1000 resamples, seed 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from neurovfm.eval.metrics import paired_bootstrap
from neurovfm.tokens.cache import atomic_write_text


def _run(folder: str, mod: str) -> tuple[dict, np.lib.npyio.NpzFile] | None:
    path = os.path.join(folder, f"predictions_{mod.lower()}.npz")
    if not os.path.isfile(path):
        return None
    with open(os.path.join(folder, "external.json")) as fh:
        meta = json.load(fh)["modalities"][mod]
    return meta, np.load(path, allow_pickle=False)


def main() -> int:
    try:
        return run()
    except (OSError, KeyError, ValueError) as e:  # a missing file, a folder that is not evaluate-external output
        sys.exit(f"paired_external.py: {type(e).__name__}: {e}")


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--labels", required=True, help="the keyed labels.csv both runs scored (patients for the resampling)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out")
    a = ap.parse_args()
    patient = {r["study_key"]: r["patient_key"] for r in csv.DictReader(open(a.labels))}
    res = {"a": a.a, "b": a.b, "difference": "b - a", "command": " ".join(sys.argv), "modalities": {}}
    for mod in ("CT", "MR"):
        ra, rb = _run(a.a, mod), _run(a.b, mod)
        if ra is None or rb is None:
            continue
        (ma, pa), (mb, pb) = ra, rb
        if list(pa["study_keys"]) != list(pb["study_keys"]) or list(pa["labels"]) != list(pb["labels"]):
            sys.exit(f"{mod}: the two runs scored different studies or labels")
        if ma["headline_labels"] != mb["headline_labels"]:
            sys.exit(f"{mod}: different headline labels ({len(ma['headline_labels'])} vs {len(mb['headline_labels'])})")
        cols = [list(pa["labels"]).index(lab) for lab in ma["headline_labels"]]
        groups = [patient[k] for k in pa["study_keys"]]
        d = paired_bootstrap(pa["y"][:, cols], pb["logits"][:, cols], pa["logits"][:, cols], groups, n=a.bootstrap)
        res["modalities"][mod] = {"studies": len(groups), "patients": len(set(groups)),
                                  "headline_labels": ma["headline_labels"],
                                  "a_macro_auroc": ma["macro_auroc"], "b_macro_auroc": mb["macro_auroc"],
                                  "b_minus_a": d}
        print(f"{mod}: {len(ma['headline_labels'])} labels, {len(groups)} studies: B - A {d['estimate']:+.3f} "
              f"[{d['low']:+.3f}, {d['high']:+.3f}]")
    if not res["modalities"]:
        sys.exit("no modality scored by both runs")
    if a.out:
        atomic_write_text(a.out, json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
