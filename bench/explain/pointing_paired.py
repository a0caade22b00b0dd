"""Two pointing games on the same findings, paired: B's hit rate minus A's, patient bootstrap.

    python bench/explain/pointing_paired.py A/pointing.json B/pointing.json [--modality CT] [--out PAIRED.json]

Both files must come from `neurovfm pointing` on the same archive and split with heads of the
same labels, so that their findings are the same rows in the same order (checked: patient,
modality, label, size and side of every row); each map source present in both is compared. The
resampler is the evaluation's (patients with replacement, ``eval.metrics.patient_weights``).
``--modality`` keeps one modality's findings of both files (e.g. a model with a CT head only against
the CT rows of a model with both heads).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from neurovfm.eval.metrics import patient_weights
from neurovfm.tokens.cache import atomic_write_text

ROW_ID = ("patient", "modality", "label", "size_mm", "side")


def paired(a: dict, b: dict, bootstrap: int = 1000, seed: int = 0, modality: str | None = None) -> dict:
    ra, rb = a["findings"], b["findings"]
    if modality is not None:
        ra, rb = [r for r in ra if r["modality"] == modality], [r for r in rb if r["modality"] == modality]
    if len(ra) != len(rb) or any(tuple(x[k] for k in ROW_ID) != tuple(y[k] for k in ROW_ID) for x, y in zip(ra, rb)):
        raise SystemExit("the two pointing files do not hold the same findings in the same order "
                         "(another archive, split, size cut-off or label set?)")
    if not ra:
        raise SystemExit("no findings to compare" + (f" for modality {modality!r}" if modality else ""))
    pats = np.array([r["patient"] for r in ra])
    w = patient_weights(pats, bootstrap, seed)
    out = {"modality": modality, "n_findings": len(ra), "n_patients": int(len(np.unique(pats))),
           "bootstrap": bootstrap, "seed": seed,
           "uniform_hit_rate": float(np.mean([r["uniform_hit"] for r in ra])), "sources": {}}
    for src in a["config"]["map_sources"]:
        if src not in b["config"]["map_sources"]:
            continue
        res = {}
        for what in ("hit", "mass_inside"):
            xa = np.array([float(r[f"{what}_{src}"]) for r in ra])
            xb = np.array([float(r[f"{what}_{src}"]) for r in rb])
            d = (w @ (xb - xa)) / w.sum(1)
            res[what] = {"a": float(xa.mean()), "b": float(xb.mean()), "b_minus_a": float((xb - xa).mean()),
                         "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]}
        out["sources"][src] = res
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", help="compare only this modality's findings (CT or MR)")
    args = p.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        res = paired(json.load(fa), json.load(fb), args.bootstrap, args.seed, args.modality)
    res["files"] = {"a": args.a, "b": args.b}
    text = json.dumps(res, indent=1)
    if args.out:
        atomic_write_text(args.out, text)
    for src, r in res["sources"].items():
        h = r["hit"]
        print(f"{src}: hit rate A {h['a']:.3f}  B {h['b']:.3f}  B-A {h['b_minus_a']:+.3f} "
              f"[{h['ci95'][0]:+.3f}, {h['ci95'][1]:+.3f}]  (uniform {res['uniform_hit_rate']:.3f}, "
              f"{res['n_findings']} findings, {res['n_patients']} patients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
