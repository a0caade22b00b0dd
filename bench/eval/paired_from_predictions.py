"""Paired comparisons of any two models of one `evaluate` run, from its predictions.csv.

`neurovfm evaluate` compares the first feature set with each other one; this recomputes the same
patient-resampled paired bootstrap (neurovfm.eval.metrics.paired_bootstrap, headline labels from
metrics.json, the run's resample count and seed) for pairs it did not report, e.g. the second
encoder against the random-init twin, without refitting anything.

    python bench/eval/paired_from_predictions.py EVAL/predictions.csv EVAL/metrics.json \
        --pair tube random --pair tube histogram [--run EVAL2/predictions.csv EVAL2/metrics.json] [--out JSON]
    python bench/eval/paired_from_predictions.py ... --pooled ref,ref_s1,ref_s2 random,random_s1,random_s2

``--run`` adds the models of another evaluate run on the same labels file, split and settings (a new
encoder against the random-init twin and histogram evaluated earlier, without refitting their heads);
the runs must agree on the resample count, seed and headline labels and score the same test studies,
and a model name may appear in one run only: a third value ``--run PRED METRICS SUFFIX`` (or
``--suffix SUFFIX`` for the first run) appends SUFFIX to that run's model names, so the same
features evaluated two ways (e.g. with and without ``--standardize``) pair as ``ref_std - ref``.
``--pooled`` compares replicates: the seed-averaged macro AUROC of one list of models minus another's,
each model scored on the same patient resamples, with each replicate's own estimate listed, and a
"verdict" (eval.metrics.replication_verdict): "A better" / "A worse" only when the patient-bootstrap
and the seed-level t interval agree, else "no evidence" (or "not replicated" with one seed a side).

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


def read_predictions(path: str, suffix: str = "") -> dict[tuple[str, str], dict[str, dict]]:
    """(model + suffix, modality) -> study -> {"patient": hash, label: (truth, raw probability)}."""
    rows: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            st = rows[(r["model"] + suffix, r["modality"])].setdefault(r["study"], {"patient": r["patient"]})
            st[r["label"]] = (float(r["truth"]), float(r["prob_raw"]))
    return rows


def merge_runs(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One (predictions, metrics) view of several evaluate runs; ValueError where they disagree."""
    preds: dict = {}
    summary: dict = {"models": {}, "config": dict(runs[0][1].get("config", {}))}
    for p, m in runs:
        cfg = m.get("config", {})
        for key in ("bootstrap", "seed"):
            if cfg.get(key) != summary["config"].get(key):
                raise ValueError(f"the runs differ in {key} ({summary['config'].get(key)} vs {cfg.get(key)})")
        for name, entry in m["models"].items():
            if name in summary["models"]:
                raise ValueError(f"model {name!r} is in two runs: rename it in one")
            summary["models"][name] = entry
        preds.update(p)
    return preds, summary


def compare(preds: dict, summary: dict, a: str | list[str], b: str | list[str], n: int, seed: int) -> dict[str, dict]:
    """Model ``a`` minus model ``b`` per modality over the headline labels of ``a``'s entry; given
    lists of models (replicates, e.g. one per pretraining seed), the mean over ``a``'s replicates
    minus the mean over ``b``'s (neurovfm.eval.metrics.replicate_paired_bootstrap)."""
    names_a, names_b = ([a] if isinstance(a, str) else list(a)), ([b] if isinstance(b, str) else list(b))
    out = {}
    for mod, entry in summary["models"].get(names_a[0], {}).items():
        labels = entry.get("headline_labels") or []
        sides = [[preds.get((m, mod)) for m in names] for names in (names_a, names_b)]
        if not labels or not all(p for side in sides for p in side):
            continue
        ref = sides[0][0]
        studies = sorted(ref)
        y = np.array([[ref[s].get(lab, (np.nan,))[0] for lab in labels] for s in studies])
        scores: list[list[np.ndarray]] = [[], []]
        for k, names in enumerate((names_a, names_b)):
            for m, pm in zip(names, sides[k]):
                other = summary["models"].get(m, {}).get(mod, {}).get("headline_labels")
                if other is not None and list(other) != list(labels):
                    raise ValueError(f"{names_a[0]} and {m} have different {mod} headline labels: not the same evaluation")
                if set(pm) != set(ref):
                    raise ValueError(f"{names_a[0]} and {m} scored different {mod} test studies: not a paired comparison")
                ym = np.array([[pm[s].get(lab, (np.nan,))[0] for lab in labels] for s in studies])
                if not np.array_equal(y, ym, equal_nan=True):
                    raise ValueError(f"{names_a[0]} and {m} were scored against different {mod} labels: "
                                     "not the same labels file")
                scores[k].append(np.array([[pm[s].get(lab, (0, np.nan))[1] for lab in labels] for s in studies]))
        groups = np.array([ref[s]["patient"] for s in studies])
        out[mod] = M.replicate_paired_bootstrap(y, scores[0], scores[1], groups, M.auroc, n=n, seed=seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions")
    ap.add_argument("metrics")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="model A minus model B (names as in the run; repeatable)")
    ap.add_argument("--pooled", nargs=2, action="append", default=[], metavar=("A1,A2,..", "B1,B2,.."),
                    help="replicates: the mean over models A1, A2, .. minus the mean over B1, B2, .. on shared "
                         "patient resamples, e.g. pretrained encoders of several seeds against their random-init "
                         "twins (repeatable); with as many A's as B's, paired by position, 'replicate_t' adds "
                         "Student's t interval over the per-pair differences (the seed-to-seed spread)")
    ap.add_argument("--run", nargs="+", action="append", default=[], metavar="PREDICTIONS METRICS [SUFFIX]",
                    help="another evaluate run on the same split whose models join the pairs, its model names "
                         "with SUFFIX appended if given (repeatable)")
    ap.add_argument("--suffix", default="", help="appended to the first run's model names")
    ap.add_argument("--out")
    a = ap.parse_args()
    for r in a.run:
        if len(r) not in (2, 3):
            ap.error(f"--run takes PREDICTIONS METRICS [SUFFIX], not {len(r)} values")
    runs = []
    for pred_path, metrics_path, *suffix in [(a.predictions, a.metrics, a.suffix), *a.run]:
        sfx = suffix[0] if suffix else ""
        try:
            with open(metrics_path) as fh:
                summary = json.load(fh)
            summary["models"] = {name + sfx: entry for name, entry in summary["models"].items()}
            runs.append((read_predictions(pred_path, sfx), summary))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:  # unreadable, not JSON, not evaluate's
            ap.error(f"{metrics_path} / {pred_path}: not an evaluate run's metrics.json and predictions.csv ({e!r})")
    try:
        preds, summary = merge_runs(runs)
    except ValueError as e:
        ap.error(str(e))
    models = summary["models"]
    if not a.pair and not a.pooled:
        ap.error("give at least one --pair or --pooled")
    for x, y in a.pair:
        if x not in models or y not in models or x == y:
            ap.error(f"--pair {x} {y}: give two different models among {sorted(models)}")
    pooled = [(x.split(","), y.split(",")) for x, y in a.pooled]
    for xs, ys in pooled:
        if not all(m in models for m in xs + ys) or set(xs) & set(ys) or len(set(xs + ys)) < len(xs + ys):
            ap.error(f"--pooled {','.join(xs)} {','.join(ys)}: give two disjoint lists of distinct models "
                     f"among {sorted(models)}")
    cfg = summary.get("config", {})
    n, seed = int(cfg.get("bootstrap", 1000)), int(cfg.get("seed", 0))
    res = {}
    for x, y in a.pair:
        try:
            res[f"{x} - {y}"] = compare(preds, summary, x, y, n, seed)
        except ValueError as e:
            ap.error(str(e))
    for xs, ys in pooled:
        try:
            per_mod = compare(preds, summary, xs, ys, n, seed)
        except ValueError as e:
            ap.error(str(e))
        for r in per_mod.values():  # the seed_replication.sh decision rule, A = the first list
            r["verdict"] = M.replication_verdict(r)
        res[f"mean({', '.join(xs)}) - mean({', '.join(ys)})"] = per_mod
    text = json.dumps({"predictions": [a.predictions, *(r[0] for r in a.run)], "bootstrap": n, "seed": seed,
                       "comparisons": res}, indent=1)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
