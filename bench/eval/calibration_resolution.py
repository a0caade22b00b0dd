"""Calibration resolution from an `evaluate` predictions.csv: per model and modality, the headline
labels' mean plug-in ECE beside its floor (what a perfectly calibrated model with the same
predictions scores at this test size), the debiased RMS calibration error, the pooled ECE over
every headline probability with its floor and p-value, and the test size a 0.05 floor needs.

    python bench/eval/calibration_resolution.py EVAL/predictions.csv EVAL/metrics.json [--out JSON]

The headline labels are read from metrics.json, so the numbers are those `evaluate` reports
(same functions: neurovfm.eval.metrics.calibration_check / studies_for_ece_floor).
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
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    with open(a.predictions, newline="") as fh:
        for r in csv.DictReader(fh):
            rows[(r["model"], r["modality"], r["label"])].append((float(r["truth"]), float(r["prob_calibrated"])))
    out: dict[str, dict] = {}
    for model, per in summary["models"].items():
        for mod, e in per.items():
            labels = e.get("headline_labels") or []
            if not labels:
                continue
            checks, ys, ps, need = [], [], [], []
            for lab in labels:
                y, p = map(np.array, zip(*rows[(model, mod, lab)]))
                checks.append(M.calibration_check(y, p, seed=a.seed))
                need.append(M.studies_for_ece_floor(p, 0.05, seed=a.seed))
                ys.append(y)
                ps.append(p)
            pooled = M.calibration_check(np.concatenate(ys), np.concatenate(ps), seed=a.seed)
            res = {"labels": len(labels), "test_studies": e["test_studies"],
                   "macro_auroc": e["macro_auroc"]["estimate"],
                   "ece_after_mean": float(np.mean([c["ece"] for c in checks])),
                   "ece_floor_mean": float(np.mean([c["ece_floor"] for c in checks])),
                   "rmsce_debiased": float(np.sqrt(max(0.0, np.mean([c["squared_ce_debiased"] for c in checks])))),
                   "labels_miscalibrated_p05": int(sum(c["p_value"] < 0.05 for c in checks)),
                   "pooled_ece": pooled["ece"], "pooled_ece_floor": pooled["ece_floor"],
                   "pooled_p_value": pooled["p_value"], "pooled_n": int(sum(len(y) for y in ys)),
                   "test_studies_for_floor_0_05_median": int(np.median(need))}
            out.setdefault(model, {})[mod] = res
            print(f"{model:>10s} {mod}: AUROC {res['macro_auroc']:.3f}  ECE {res['ece_after_mean']:.3f} (floor "
                  f"{res['ece_floor_mean']:.3f})  debiased RMS {res['rmsce_debiased']:.3f}  miscalibrated "
                  f"{res['labels_miscalibrated_p05']}/{res['labels']}  pooled ECE {res['pooled_ece']:.3f} (floor "
                  f"{res['pooled_ece_floor']:.3f}, p {res['pooled_p_value']:.3f}, n {res['pooled_n']})  "
                  f"studies for a 0.05 floor ~{res['test_studies_for_floor_0_05_median']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"command": "python bench/eval/calibration_resolution.py " + f"{a.predictions} {a.metrics}",
                       "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
