"""How to store CT tokens: one fixed-point HU view (int16) or three uint8 windows?

Measures, side by side in one run on the same series: bytes on disk per token, and read cost
for the two access patterns the trainers use (pretraining draws ONE window per CT series;
inference reads ALL three). Prints ratios; writes bench/results/ct_storage.json.

    python bench/cache/bench_ct_storage.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.privacy.keys import Keyer
from neurovfm.synth.phantom import write_phantom_series
from neurovfm.tokens.cache import TokenCache


def _shard_bytes(root: str) -> int:
    d = os.path.join(root, "shards")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def _time(fn, repeats=30) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> int:
    keyer = Keyer(b"bench")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        write_phantom_series(os.path.join(src, "ct"), "axial", n=40, rows=256, cols=256, ps=(0.8, 0.8), step=4.0)
        res = {}
        for storage in ("hu16", "views8"):
            cache = os.path.join(tmp, storage)
            run_ingest(src, cache, IngestOptions(progress=False, policy=PreprocessPolicy(ct_storage=storage)), keyer=keyer)
            c = TokenCache(cache)
            (e,) = c.series()
            os.system("sync")
            one = _time(lambda: c.views(e, ["blood"]))
            three = _time(lambda: c.views(e))
            res[storage] = {"bytes": _shard_bytes(cache), "tokens": int(e.n_tokens),
                            "bytes_per_token": _shard_bytes(cache) / int(e.n_tokens),
                            "read_one_view_s": one, "read_three_views_s": three}
    h, v = res["hu16"], res["views8"]
    res["ratios"] = {
        "bytes_hu16_over_views8": h["bytes"] / v["bytes"],
        "read_one_view_hu16_over_views8": h["read_one_view_s"] / v["read_one_view_s"],
        "read_three_views_hu16_over_views8": h["read_three_views_s"] / v["read_three_views_s"],
    }
    res["command"] = "python bench/cache/bench_ct_storage.py"
    print(f"{'storage':8s} {'bytes/token':>12s} {'one view (ms)':>14s} {'three views (ms)':>17s}")
    for k in ("hu16", "views8"):
        r = res[k]
        print(f"{k:8s} {r['bytes_per_token']:12.0f} {r['read_one_view_s'] * 1e3:14.2f} {r['read_three_views_s'] * 1e3:17.2f}")
    for k, val in res["ratios"].items():
        print(f"{k}: {val:.2f}")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/ct_storage.json", "w") as fh:
        json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
