"""An ensemble of CNN runs after the fact: the mean logit of several difficulty.py results' kept
per-study test scores (different seeds, grids or input settings), scored as difficulty.py scores one.

    python bench/synth/score_ensemble.py --variant cnn_mask_aux R1.json R2.json ... --out RECORD.json

Every file must have scored the same test studies (same archive, split and site secret). The record
holds the ensemble's test macro AUROC (CT, MRI, and their mean, as difficulty.py reports it), per
label, each member's own (recomputed from its scores, and checked against what the file reports)
and each member's command, so every run reproduces.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from result_file import MODS, ResultFileError, files_main, read_cnn_result, test_scores  # this folder

from neurovfm.eval.metrics import auroc


def score(test: dict[str, dict], logits: dict[str, np.ndarray], labels: list[str]) -> dict:
    """Test macro AUROC per modality over ``labels`` and their mean (difficulty.py's ``evaluate``)."""
    out = {}
    for mod in MODS:
        keys = sorted(k for k, v in test.items() if v["modality"] == mod)
        y = np.array([test[k]["y"] for k in keys], float)
        s = np.stack([logits[k] for k in keys])
        per = {h: auroc(y[:, j], s[:, j]) for j, h in enumerate(labels)}
        out[mod] = {"n_test": len(keys), "auroc": per, "macro": float(np.nanmean(list(per.values())))}
    out["macro"] = float(np.nanmean([out[m]["macro"] for m in MODS]))
    return out


def ensemble(paths: list[str], variant: str) -> dict:
    if len(paths) < 2:
        raise ResultFileError(f"an ensemble needs at least two result files, got {len(paths)}")
    members, tests = [], []
    labels = None
    for p in paths:
        whole, r = read_cnn_result(p, variant, ("seed",))
        test = test_scores(p, r)
        names = list(r["scores"].get("labels") or [])
        if labels is None:
            labels = names
        elif names != labels:
            raise ResultFileError(f"{p}: scores labels {names}, {paths[0]} scores {labels}")
        if tests and set(test) != set(tests[0]):
            raise ResultFileError(f"{p}: scored other test studies than {paths[0]} (another archive, split or "
                                  "NEUROVFM_SITE_SECRET)")
        own = score(test, {k: np.asarray(v["score"], float) for k, v in test.items()}, labels)
        if abs(own["macro"] - float(r["macro"])) > 1e-9:
            raise ResultFileError(f"{p}: its kept scores give macro AUROC {own['macro']:.6f}, the file reports "
                                  f"{float(r['macro']):.6f}")
        tests.append(test)
        members.append({"file": os.path.basename(p), "command": whole.get("command", ""),
                        "seed": r["setup"]["seed"], "grid_mm": r["setup"].get("grid_mm"),
                        "antialias": r["setup"].get("antialias"),
                        "macro": own["macro"], **{m: own[m]["macro"] for m in MODS}})
    mean = {k: np.mean([np.asarray(t[k]["score"], float) for t in tests], 0) for k in tests[0]}
    res = score(tests[0], mean, labels)
    return {"members": members, "ensemble": res, "labels": labels,
            "member_mean": {p: float(np.mean([m[p] for m in members])) for p in ("macro", *MODS)}}


def report(res: dict) -> None:
    for m in res["members"]:
        print(f"{m['file']}: macro {m['macro']:.3f} (CT {m['CT']:.3f}, MR {m['MR']:.3f})")
    e = res["ensemble"]
    print(f"ensemble of {len(res['members'])}: macro {e['macro']:.3f} (CT {e['CT']['macro']:.3f}, MR {e['MR']['macro']:.3f})")
    for mod in MODS:
        print(f"  {mod}: " + "  ".join(f"{h}={v:.2f}" for h, v in e[mod]["auroc"].items()))


def main() -> int:
    return files_main("score_ensemble", __doc__, "difficulty.py result files that keep per-study scores", ensemble, report)


if __name__ == "__main__":
    sys.exit(main())
