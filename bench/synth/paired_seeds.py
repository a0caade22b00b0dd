"""Two CNN input or training settings compared seed by seed: difficulty.py result files of setting A
and of setting B, paired on the CNN's seed (same archive, epochs and variant otherwise).

    python bench/synth/paired_seeds.py --variant cnn_mask_aux --a A_S0.json A_S1.json ... \
        --b B_S0.json B_S1.json ... [--names antialias,point] --out RECORD.json

Each seed gives one difference of test macro AUROC (both modalities, and each), so the seed-level
t interval (eval.metrics.replicate_t_interval) says whether A beats B beyond what a seed moves; the
per-label means show where. The record keeps each file's own command, so each run reproduces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from result_file import MODS, ResultFileError, read_cnn_result  # this folder

from neurovfm.eval.metrics import replicate_t_interval

SETUP_KEYS = ("seed", "epochs", "aux_weight", "grid", "train_fraction", "training_labels")


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


def _same(a: dict, b: dict, key: str) -> bool:
    return json.dumps(a["setup"].get(key), sort_keys=True) == json.dumps(b["setup"].get(key), sort_keys=True)


def compare(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str]) -> dict:
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise RecordError(f"needs at least two seeds run in both settings, got {seeds} "
                          f"(A: {sorted(a)}, B: {sorted(b)})")
    for s in seeds:
        for key in SETUP_KEYS[1:]:
            if not _same(a[s], b[s], key):
                raise RecordError(f"seed {s}: {a[s]['file']} and {b[s]['file']} differ in '{key}' "
                                  f"({a[s]['setup'].get(key)} vs {b[s]['setup'].get(key)}): not a paired comparison")
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
    out = {"seeds": seeds, "names": list(names), "per_seed": per_seed,
           "mean": {}, "difference_t95": {p: replicate_t_interval(d) for p, d in diffs.items()},
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
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = tuple(a.names.split(","))
    if len(names) != 2 or len(set(names)) != 2 or not all(names):
        ap.error(f"--names needs two different names, got {a.names!r}")
    try:
        res = compare(load_runs(a.a, a.variant), load_runs(a.b, a.variant), names)
    except ResultFileError as e:
        print(f"paired_seeds: {e}", file=sys.stderr)
        return 2
    res = {"command": "python bench/synth/paired_seeds.py " + " ".join(sys.argv[1:]), "variant": a.variant, **res}
    for row in res["per_seed"]:
        print(f"seed {row['seed']}: " + "  ".join(
            f"{p} {row[p][names[0]]:.3f} vs {row[p][names[1]]:.3f} ({row[p]['difference']:+.3f})" for p in ("macro", "CT", "MR")))
    for p, t in res["difference_t95"].items():
        print(f"{names[0]} - {names[1]} {p}: {t['estimate']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] (t, {len(res['seeds'])} seeds)")
    tmp = a.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=2)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
