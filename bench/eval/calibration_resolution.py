"""Calibration resolution from an `evaluate` predictions.csv: per model and modality, the headline
labels' mean plug-in ECE beside its floor (what a perfectly calibrated model with the same
predictions scores at this test size), the debiased RMS calibration error, the pooled ECE over
every headline probability with its floor and p-value, and the test size a 0.05 floor needs.

    python bench/eval/calibration_resolution.py EVAL/predictions.csv EVAL/metrics.json [--out JSON]

The headline labels are read from metrics.json, and the numbers come from the function `evaluate`
reports with (neurovfm.eval.metrics.calibration_resolution), so they are the same; this script
recomputes them from the saved predictions alone (e.g. for a run made before they were reported).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict

import numpy as np

from neurovfm.eval import metrics as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions")
    ap.add_argument("metrics")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    summary = json.load(open(a.metrics))
    probs: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    with open(a.predictions, newline="") as fh:
        for r in csv.DictReader(fh):
            probs[(r["model"], r["modality"])][r["study"]][r["label"]] = (float(r["truth"]), float(r["prob_calibrated"]))
    out: dict[str, dict] = {}
    for model, per in summary["models"].items():
        for mod, e in per.items():
            labels = e.get("headline_labels") or []
            if not labels:
                continue
            studies = probs[(model, mod)]
            cell = [[studies[s].get(lab, (np.nan, np.nan)) for lab in labels] for s in sorted(studies)]
            arr = np.array(cell, np.float64)  # [studies, labels, (truth, prob)]
            res = M.calibration_resolution(arr[..., 0], arr[..., 1], labels, seed=a.seed)
            res.update(labels=len(labels), test_studies=e["test_studies"], macro_auroc=e["macro_auroc"]["estimate"])
            out.setdefault(model, {})[mod] = res
            print(f"{model:>10s} {mod}: AUROC {res['macro_auroc']:.3f}  ECE {res['ece_after_mean']:.3f} (floor "
                  f"{res['ece_floor_mean']:.3f})  debiased RMS {res['rmsce_debiased_mean']:.3f}  miscalibrated "
                  f"{len(res['miscalibrated_labels'])}/{len(labels)}  pooled ECE {res['pooled_ece']:.3f} (floor "
                  f"{res['pooled_ece_floor']:.3f}, p {res['pooled_ece_p']:.3f}, n {res['pooled_n']})  "
                  f"studies for a 0.05 floor ~{res['test_studies_for_floor_0_05_median']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"command": f"python bench/eval/calibration_resolution.py {a.predictions} {a.metrics}",
                       "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
