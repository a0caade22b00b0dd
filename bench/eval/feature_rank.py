"""Effective rank of frozen token features, per modality, on one split: how many directions the
features use (the pretraining monitor's measure, exp of the singular-value entropy of centred
features), to compare readouts (`embed --layers`) and encoders on the same tokens.

    python bench/eval/feature_rank.py --features tube=F1 tube_last4=F2 random=F3 \
        --labels KEYED/labels_keyed.csv [--split val] [--tokens 4096] [--out JSON]

Tokens are a seeded sample of the split's studies (the same studies and positions for every
feature folder, so the numbers are paired); the histogram baseline has no rank to speak of and is
skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from neurovfm.errors import NeuroVFMError
from neurovfm.pretrain.data import read_splits
from neurovfm.pretrain.monitors import effective_rank
from neurovfm.probe.embed import FeatureStore


def sample_rows(store: FeatureStore, studies: list[str], n: int, seed: int) -> dict[str, np.ndarray]:
    """Per modality, ``n`` token features drawn from the given studies (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    out = {}
    for mod in ("CT", "MR"):
        keys = [s for s in studies if store.modality(s) == mod]
        if not keys:
            continue
        bags = [store.bag(k) for k in keys]
        sizes = np.array([len(b) for b in bags])
        pick = rng.choice(sizes.sum(), size=min(n, int(sizes.sum())), replace=False)
        out[mod] = np.concatenate(bags)[np.sort(pick)]
    return out


def ranks(features: dict[str, str], labels: str, split: str = "val", tokens: int = 4096,
          seed: int = 0) -> dict[str, dict[str, float]]:
    splits = read_splits(labels)
    res = {}
    for name, path in features.items():
        store = FeatureStore(path)
        if str(store.meta.get("encoder_id", "")).startswith("histogram"):
            continue
        studies = sorted(s for s in store.studies() if splits.get(s) == split)
        rows = sample_rows(store, studies, tokens, seed)
        res[name] = {"readout_layers": store.readout_layers, "dim": store.dim,
                     **{mod: effective_rank(torch.from_numpy(x), max_tokens=len(x)) for mod, x in rows.items()},
                     "studies": len(studies)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--labels", required=True, help="keyed labels.csv (study_key, split)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    feats = {}
    for item in a.features:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in feats:
            ap.error(f"--features: {item!r} is not NAME=DIR with a new NAME")
        feats[name] = path
    try:
        res = ranks(feats, a.labels, a.split, a.tokens, a.seed)
    except NeuroVFMError as e:
        print(f"feature_rank: {e}", file=sys.stderr)
        return 2
    for name, r in res.items():
        print(f"{name:20s} blocks {r['readout_layers'] or 'last'}: " +
              "  ".join(f"{m} {r[m]:.1f}" for m in ("CT", "MR") if m in r) + f"  (of {r['dim']})")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"split": a.split, "tokens": a.tokens, "seed": a.seed, "ranks": res}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
