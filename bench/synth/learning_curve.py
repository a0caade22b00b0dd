"""Is the labels-only CNN still data-limited at the default archive's size? Collect the points of a
learning curve made by ``difficulty.py --only-cnn --aux-weight 0 --train-fraction F`` (plus the full
record's ``cnn``), print a table and plot test macro AUROC against training studies (log scale).

    python bench/synth/learning_curve.py bench/results/synth_difficulty.json \
        bench/results/synth_learning_curve_f050.json bench/results/synth_learning_curve_f025.json \
        [--out bench/results/synth_learning_curve]

Writes OUT.json (the points) and OUT.png. A curve still rising at the full train split says more
studies would help a labels-only learner; a flat one says the archive, not the data size, limits it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from result_file import ResultFileError, read_cnn_result  # this folder


CurveInputError = ResultFileError  # a results file that cannot be a point of the curve (named in the message)


def points(paths: list[str]) -> list[dict]:
    """One point per difficulty.py JSON file, sorted by train fraction."""
    out = []
    for path in paths:
        _, r = read_cnn_result(path, "cnn", ("train_fraction", "epochs", "n_train_studies"))
        setup = r["setup"]
        out.append({"file": path, "train_fraction": float(setup["train_fraction"]), "epochs": setup["epochs"],
                    "n_train_studies": setup["n_train_studies"],
                    "macro": r["macro"], "CT": r["CT"]["macro"], "MR": r["MR"]["macro"],
                    "per_label": {m: r[m]["auroc"] for m in ("CT", "MR")}})
    fractions = [p["train_fraction"] for p in out]
    if len(set(fractions)) != len(fractions):
        raise CurveInputError(f"two results share a train fraction: {sorted(fractions)}")
    return sorted(out, key=lambda p: p["train_fraction"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="difficulty.py JSON files, one per train fraction")
    ap.add_argument("--out", default="bench/results/synth_learning_curve")
    a = ap.parse_args()
    try:
        pts = points(a.results)
    except CurveInputError as exc:
        ap.error(str(exc))
    print("fraction  train studies (CT / MR)  epochs  macro   CT     MR")
    for p in pts:
        n = p["n_train_studies"]
        print(f"{p['train_fraction']:8.2f}  {n.get('CT', '?')!s:>6} / {n.get('MR', '?')!s:<6}          "
              f"{p['epochs']:6d}  {p['macro']:.3f}  {p['CT']:.3f}  {p['MR']:.3f}")
    with open(a.out + ".json", "w") as fh:
        json.dump({"command": " ".join(sys.argv), "points": pts}, fh, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mod, style in (("CT", "o-"), ("MR", "s-")):
        xs = [p["n_train_studies"].get(mod, np.nan) for p in pts]
        ax.plot(xs, [p[mod] for p in pts], style, label=mod)
    ax.axhline(0.85, ls="--", c="grey", lw=1, label="target 0.85")
    ax.set_xscale("log")
    ax.set_xlabel("training studies (labels only)")
    ax.set_ylabel("test macro AUROC, headline labels")
    ax.set_title("3-D CNN learning curve, default archive", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print(f"wrote {a.out}.json and {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
