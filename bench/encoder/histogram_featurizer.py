"""Per-token intensity histograms (``HistogramFeaturizer``, run by ``embed histogram:BINS``,
``embed --append-histogram`` and by ``analyze`` for heads on appended histograms): the shipped
bincount form against the scatter-add form (``np.add.at``) it replaced, side by side in one run on
the same tokens, with the ratio and an exact-equality check.

    python bench/encoder/histogram_featurizer.py [--tokens 5000] [--bins 32] [--repeats 5] [--out R.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from neurovfm.probe.embed import HISTOGRAM_VIEWS, HistogramFeaturizer
from neurovfm.tokens.cache import atomic_write_text


def scatter_add(tok_u8: np.ndarray, view: str, bins: int) -> np.ndarray:
    """The reference form: one np.add.at per voxel."""
    dim = bins * len(HISTOGRAM_VIEWS)
    idx = (tok_u8.astype(np.int64) * bins) >> 8
    out = np.zeros((len(tok_u8), dim), np.float32)
    rows = np.repeat(np.arange(len(tok_u8)), tok_u8.shape[1])
    np.add.at(out, (rows, HISTOGRAM_VIEWS.index(view) * bins + idx.ravel()), 1.0)
    return out / tok_u8.shape[1]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=5000)  # about one CT window of a head
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    tok = np.random.default_rng(0).integers(0, 256, (a.tokens, 4 * 16 * 16), dtype=np.uint8)
    h = HistogramFeaturizer(a.bins)
    same = bool(np.array_equal(h(tok, "blood"), scatter_add(tok, "blood", a.bins)))
    ref = best_of(lambda: scatter_add(tok, "blood", a.bins), a.repeats)
    new = best_of(lambda: h(tok, "blood"), a.repeats)
    res = {"tokens": a.tokens, "voxels_per_token": tok.shape[1], "bins": a.bins, "repeats": a.repeats,
           "scatter_add_s": ref, "bincount_s": new, "speedup": ref / new, "identical": same,
           "command": "python bench/encoder/histogram_featurizer.py" + (f" --out {a.out}" if a.out else "")}
    print(json.dumps(res, indent=1))
    if a.out:
        atomic_write_text(a.out, json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
