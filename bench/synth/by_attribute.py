"""One label's test AUROC split by an attribute of its finding (e.g. small vessel disease by Fazekas
grade): each group of positive studies against all the modality's negative studies, from
difficulty.py result files that keep their per-study scores and the archive's findings.jsonl.

    python bench/synth/by_attribute.py ARCHIVE R1.json [R2.json ...] --label small_vessel_ischemic_disease \
        --attribute fazekas [--variant cnn_mask_aux] [--out RECORD.json]

Where a label sits near chance, this says whether every grade is missed or only the mild ones: an
archive whose severe lesions are missed too draws them wrong. Study keys are the archive's study
UIDs keyed with NEUROVFM_SITE_SECRET, as difficulty.py keys them. With several files (seeds), each
file's AUROCs and their mean; each file's all-positives AUROC is checked against what it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from result_file import MODS, ResultFileError, read_cnn_result, test_scores, write_record  # this folder

from neurovfm.eval.metrics import auroc
from neurovfm.privacy.keys import Keyer


def finding_attributes(archive: str, label: str, attribute: str, keyer: Keyer) -> dict[str, str]:
    """study key -> the ``attribute`` of its ``label`` finding ("none" where the finding lacks it);
    studies without that finding are left out."""
    path = os.path.join(archive, "findings.jsonl")
    try:
        with open(path) as fh:
            recs = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError) as exc:
        raise ResultFileError(f"{path}: cannot read the archive's findings ({exc})") from None
    out = {}
    for n, r in enumerate(recs, 1):
        try:
            vals = [f.get(attribute) for f in r.get("findings", []) if f.get("label") == label]
            if vals:
                out[keyer.study(r["study_uid"])] = str(next((v for v in vals if v is not None), "none"))
        except (AttributeError, KeyError, TypeError) as exc:
            raise ResultFileError(f"{path}: record {n} is not a `neurovfm synth` finding record "
                                  f"(missing or malformed {exc})") from None
    return out


def split_auroc(path: str, variant: str, label: str, attrs: dict[str, str]) -> dict:
    """Per modality: n negatives, and per attribute value (and "all") the positives' count and AUROC."""
    _, r = read_cnn_result(path, variant)
    test = test_scores(path, r)
    names = list(r["scores"]["labels"])
    if label not in names:
        raise ResultFileError(f"{path}: scores no {label!r} (it scores {', '.join(names)})")
    j = names.index(label)
    out = {}
    for mod in MODS:
        keys = sorted(k for k, v in test.items() if v["modality"] == mod)
        neg = [test[k]["score"][j] for k in keys if test[k]["y"][j] == 0]
        pos = [k for k in keys if test[k]["y"][j] == 1]
        orphan = next((k for k in pos if k not in attrs), None)
        if orphan is not None:
            raise ResultFileError(f"{path}: positive test study {orphan} has no {label} finding in this archive "
                                  "(another archive, or another NEUROVFM_SITE_SECRET)")
        groups: dict[str, list[float]] = {"all": [test[k]["score"][j] for k in pos]}
        for k in pos:
            groups.setdefault(attrs[k], []).append(test[k]["score"][j])
        res = {"n_negative": len(neg)}
        for g, s in groups.items():
            y = np.r_[np.zeros(len(neg)), np.ones(len(s))]
            res[g] = {"n": len(s), "auroc": auroc(y, np.r_[neg, s]) if s and neg else float("nan")}
        reported = float(r[mod]["auroc"].get(label, float("nan")))
        if not np.isnan(reported) and abs(res["all"]["auroc"] - reported) > 1e-9:
            raise ResultFileError(f"{path}: its kept {mod} scores give {label} AUROC {res['all']['auroc']:.6f}, "
                                  f"the file reports {reported:.6f}")
        out[mod] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", help="the `neurovfm synth` archive the results were measured on")
    ap.add_argument("files", nargs="+", help="difficulty.py result files that keep per-study scores")
    ap.add_argument("--label", required=True)
    ap.add_argument("--attribute", required=True, help="a field of the label's findings, e.g. fazekas, side")
    ap.add_argument("--variant", default="cnn_mask_aux", help="which result of the files: cnn or cnn_mask_aux")
    ap.add_argument("--out", help="record JSON (written atomically)")
    a = ap.parse_args()
    try:
        attrs = finding_attributes(a.archive, a.label, a.attribute, Keyer.from_site())
        per_file = {os.path.basename(p): split_auroc(p, a.variant, a.label, attrs) for p in a.files}
    except ResultFileError as e:
        print(f"by_attribute: {e}", file=sys.stderr)
        return 2
    mean: dict[str, dict] = {}
    for mod in MODS:
        groups = sorted({g for f in per_file.values() for g in f[mod] if g != "n_negative"},
                        key=lambda g: (g != "all", g))
        mean[mod] = {g: float(np.nanmean([f[mod][g]["auroc"] if g in f[mod] else np.nan for f in per_file.values()]))
                     for g in groups}
    for mod in MODS:
        first = next(iter(per_file.values()))[mod]
        print(f"{mod} ({first['n_negative']} negatives): " + "  ".join(
            f"{a.attribute}={g} (n={first[g]['n'] if g in first else 0}) {v:.2f}" if g != "all" else f"all {v:.2f}"
            for g, v in mean[mod].items()))
    if a.out:
        write_record(a.out, {"command": "python bench/synth/by_attribute.py " + " ".join(sys.argv[1:]),
                             "label": a.label, "attribute": a.attribute, "variant": a.variant,
                             "per_file": per_file, "mean_auroc": mean})
    return 0


if __name__ == "__main__":
    sys.exit(main())
