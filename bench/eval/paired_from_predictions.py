"""Paired comparisons of any two models of one `evaluate` run, from its predictions.csv.

`neurovfm evaluate` compares the first feature set with each other one; this recomputes the same
patient-resampled paired bootstrap (neurovfm.eval.metrics.paired_bootstrap, headline labels from
metrics.json, the run's resample count and seed) for pairs it did not report, e.g. the second
encoder against the random-init twin, without refitting anything.

    python bench/eval/paired_from_predictions.py EVAL/predictions.csv EVAL/metrics.json \
        --pair tube random --pair tube histogram [--out JSON]

AUROC is rank-based, so the raw probabilities (rounded to 6 decimals in the CSV) give the head's
AUROC up to ties that rounding may create.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict

import numpy as np

from neurovfm.eval import metrics as M


def read_predictions(path: str) -> dict[tuple[str, str], dict[str, dict]]:
    """(model, modality) -> study -> {"patient": hash, label: (truth, raw probability)}."""
    rows: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            st = rows[(r["model"], r["modality"])].setdefault(r["study"], {"patient": r["patient"]})
            st[r["label"]] = (float(r["truth"]), float(r["prob_raw"]))
    return rows


def compare(preds: dict, summary: dict, a: str, b: str, n: int, seed: int) -> dict[str, dict]:
    """Model ``a`` minus model ``b`` per modality over the headline labels of ``a``'s entry."""
    out = {}
    for mod, entry in summary["models"].get(a, {}).items():
        labels = entry.get("headline_labels") or []
        pa, pb = preds.get((a, mod)), preds.get((b, mod))
        if not labels or not pa or not pb:
            continue
        studies = sorted(set(pa) & set(pb))
        if set(pa) != set(pb):
            raise ValueError(f"{a} and {b} scored different {mod} test studies: not a paired comparison")
        y = np.array([[pa[s].get(lab, (np.nan,))[0] for lab in labels] for s in studies])
        sa = np.array([[pa[s].get(lab, (0, np.nan))[1] for lab in labels] for s in studies])
        sb = np.array([[pb[s].get(lab, (0, np.nan))[1] for lab in labels] for s in studies])
        groups = np.array([pa[s]["patient"] for s in studies])
        out[mod] = M.paired_bootstrap(y, sa, sb, groups, M.auroc, n=n, seed=seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions")
    ap.add_argument("metrics")
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                    help="model A minus model B (names as in the run; repeatable)")
    ap.add_argument("--out")
    a = ap.parse_args()
    try:
        with open(a.metrics) as fh:
            summary = json.load(fh)
        models = summary["models"]
        preds = read_predictions(a.predictions)
    except (OSError, ValueError, KeyError) as e:  # unreadable, not JSON, or not evaluate's files
        ap.error(f"{a.metrics} / {a.predictions}: not an evaluate run's metrics.json and predictions.csv ({e!r})")
    for x, y in a.pair:
        if x not in models or y not in models or x == y:
            ap.error(f"--pair {x} {y}: give two different models among {sorted(models)}")
    cfg = summary.get("config", {})
    n, seed = int(cfg.get("bootstrap", 1000)), int(cfg.get("seed", 0))
    res = {}
    for x, y in a.pair:
        try:
            res[f"{x} - {y}"] = compare(preds, summary, x, y, n, seed)
        except ValueError as e:
            ap.error(str(e))
    text = json.dumps({"predictions": a.predictions, "bootstrap": n, "seed": seed, "comparisons": res}, indent=1)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
