"""Two CNN input or training settings compared seed by seed: difficulty.py result files of setting A
and of setting B, paired on the CNN's seed (same archive, epochs and variant otherwise).

    python bench/synth/paired_seeds.py --variant cnn_mask_aux --a A_S0.json A_S1.json ... \
        --b B_S0.json B_S1.json ... [--names antialias,point] [--vary grid] --out RECORD.json

Each seed gives one difference of test macro AUROC (both modalities, and each), so the seed-level
t interval (eval.metrics.replicate_t_interval) says whether A beats B beyond what a seed moves; the
per-label means show where. Files that keep their per-study test scores (difficulty.py since
2026-12-05) also get the test sample's side: the seed-averaged difference per modality on the same
patient resamples (eval.metrics.replicate_paired_bootstrap), which needs only one seed. Settings
other than the seed must match, except the one named by ``--vary`` (e.g. ``grid`` to compare grid
spacings). Two archives made with the same seed hold the same studies, so a generator change can be
compared the same way (the study keys are checked). The record keeps each file's own command, so each
run reproduces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from result_file import MODS, ResultFileError, read_cnn_result, test_scores, write_record  # this folder

from neurovfm.eval.metrics import replicate_paired_bootstrap, replicate_t_interval

SETUP_KEYS = ("seed", "epochs", "aux_weight", "grid", "train_fraction", "training_labels")  # every file has them
# compared between A and B unless named by --vary; files older than a setting lack it and ran without
# it (point-sampled inputs; a study head that did not read the voxel peaks), so a missing value reads as False
COMPARED = SETUP_KEYS[1:] + ("antialias", "seg_to_head")
DEFAULTS = {"antialias": False, "seg_to_head": False}


class RecordError(ResultFileError):
    """Result files that cannot be compared (unpaired seeds, different settings), named with the reason."""


def load_runs(paths: list[str], variant: str) -> dict[int, dict]:
    """seed -> {"file", "command", "setup", "result"} for ``variant`` in each difficulty.py file."""
    out: dict[int, dict] = {}
    for p in paths:
        d, r = read_cnn_result(p, variant, SETUP_KEYS)
        seed = int(r["setup"]["seed"])
        if seed in out:
            raise RecordError(f"{p}: seed {seed} is already given by {out[seed]['file']}")
        out[seed] = {"file": os.path.basename(p), "command": d.get("command", ""), "setup": r["setup"], "result": r}
    return out


def _setting(run: dict, key: str):
    return run["setup"].get(key, DEFAULTS.get(key))


def _same(a: dict, b: dict, key: str) -> bool:
    return json.dumps(_setting(a, key), sort_keys=True) == json.dumps(_setting(b, key), sort_keys=True)


def _has_scores(run: dict) -> bool:
    try:
        test_scores(run["file"], run["result"])
    except ResultFileError:
        return False
    return True


def study_bootstrap(a: dict[int, dict], b: dict[int, dict], seeds: list[int], n: int = 2000) -> dict:
    """Per modality: mean over seeds of A's test macro AUROC minus B's, every run scored on the
    same patient resamples of the test split (the runs must have scored the same studies)."""
    out = {}
    ref = a[seeds[0]]
    for mod in MODS:
        keys = sorted(k for k, v in ref["result"]["scores"]["test"].items() if v["modality"] == mod)
        for side in (a, b):
            for s in seeds:
                got = sorted(k for k, v in side[s]["result"]["scores"]["test"].items() if v["modality"] == mod)
                if got != keys:
                    raise RecordError(f"{side[s]['file']} scored other {mod} test studies than {ref['file']}: "
                                      "not the same archive and split")
        test = ref["result"]["scores"]["test"]
        y = np.array([test[k]["y"] for k in keys], float)
        groups = [test[k]["patient"] for k in keys]
        sc = [[np.array([side[s]["result"]["scores"]["test"][k]["score"] for k in keys], float) for s in seeds]
              for side in (a, b)]
        r = replicate_paired_bootstrap(y, sc[0], sc[1], groups, n=n, seed=0)
        out[mod] = {k: r[k] for k in ("estimate", "low", "high", "p_value", "a", "b", "resamples")} | {
            "test_studies": len(keys), "patients": len(set(groups))}
    return out


def compare(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str], vary: str | None = None) -> dict:
    seeds = sorted(set(a) & set(b))
    scored = bool(seeds) and all(_has_scores(side[s]) for side in (a, b) for s in seeds)
    if len(seeds) < 2 and not (seeds and scored):
        raise RecordError(f"needs at least two seeds run in both settings, or one whose files keep their per-study "
                          f"scores, got {seeds} (A: {sorted(a)}, B: {sorted(b)})")
    if vary is not None and vary not in COMPARED:
        raise RecordError(f"--vary {vary!r}: not a compared setting (one of {', '.join(COMPARED)})")
    for s in seeds:
        for key in COMPARED:
            if key != vary and not _same(a[s], b[s], key):
                raise RecordError(f"seed {s}: {a[s]['file']} and {b[s]['file']} differ in '{key}' "
                                  f"({_setting(a[s], key)} vs {_setting(b[s], key)}): not a paired comparison"
                                  + ("" if vary else f"; name it with --vary {key} if it is the compared setting"))
    labels = list(a[seeds[0]]["result"]["CT"]["auroc"])
    per_seed, diffs = [], {"macro": [], "CT": [], "MR": []}
    for s in seeds:
        ra, rb = a[s]["result"], b[s]["result"]
        row = {"seed": s}
        for part in ("macro", "CT", "MR"):
            va = ra["macro"] if part == "macro" else ra[part]["macro"]
            vb = rb["macro"] if part == "macro" else rb[part]["macro"]
            row[part] = {names[0]: va, names[1]: vb, "difference": va - vb}
            diffs[part].append(va - vb)
        per_seed.append(row)
    out = {"seeds": seeds, "names": list(names), "varied": vary, "per_seed": per_seed,
           "mean": {}, "difference_t95": ({p: replicate_t_interval(d) for p, d in diffs.items()} if len(seeds) > 1 else None),
           "study_bootstrap": study_bootstrap(a, b, seeds) if scored else None,  # main() says why when None
           "per_label_mean": {}, "runs": {names[0]: [a[s] | {"result": None} for s in seeds],
                                          names[1]: [b[s] | {"result": None} for s in seeds]}}
    for side, runs in zip(names, (a, b)):
        out["mean"][side] = {"macro": float(np.mean([runs[s]["result"]["macro"] for s in seeds])),
                             **{m: float(np.mean([runs[s]["result"][m]["macro"] for s in seeds])) for m in MODS}}
        out["per_label_mean"][side] = {m: {h: float(np.mean([runs[s]["result"][m]["auroc"][h] for s in seeds]))
                                           for h in labels} for m in MODS}
    for side in names:
        for r in out["runs"][side]:
            del r["result"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="cnn_mask_aux", help="which result of the files: cnn or cnn_mask_aux")
    ap.add_argument("--a", nargs="+", required=True, help="setting A's difficulty.py result files, one per seed")
    ap.add_argument("--b", nargs="+", required=True, help="setting B's files, the same seeds")
    ap.add_argument("--names", default="A,B", help="the two settings' names, comma-separated")
    ap.add_argument("--vary", help="the one setting allowed to differ between A and B (e.g. grid)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = tuple(a.names.split(","))
    if len(names) != 2 or len(set(names)) != 2 or not all(names):
        ap.error(f"--names needs two different names, got {a.names!r}")
    try:
        res = compare(load_runs(a.a, a.variant), load_runs(a.b, a.variant), names, a.vary)
    except ResultFileError as e:
        print(f"paired_seeds: {e}", file=sys.stderr)
        return 2
    res = {"command": "python bench/synth/paired_seeds.py " + " ".join(sys.argv[1:]), "variant": a.variant, **res}
    for row in res["per_seed"]:
        print(f"seed {row['seed']}: " + "  ".join(
            f"{p} {row[p][names[0]]:.3f} vs {row[p][names[1]]:.3f} ({row[p]['difference']:+.3f})" for p in ("macro", "CT", "MR")))
    for p, t in (res["difference_t95"] or {}).items():
        print(f"{names[0]} - {names[1]} {p}: {t['estimate']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] (t, {len(res['seeds'])} seeds)")
    if res["study_bootstrap"] is None:
        print("no patient bootstrap: not every file keeps its per-study test scores (difficulty.py before "
              "2026-12-05); the seed-level t interval is the only one", file=sys.stderr)
    for p, t in (res["study_bootstrap"] or {}).items():
        print(f"{names[0]} - {names[1]} {p}: {t['estimate']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] "
              f"(patient bootstrap, {t['patients']} patients, {len(res['seeds'])} seed(s))")
    write_record(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
