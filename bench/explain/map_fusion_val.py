"""Which map should a head draw? head / token / token fused across a study's series (validation).

    python bench/explain/map_fusion_val.py ARCHIVE --model MODEL --out OUT.json [--split val]

Plan Q (/work/runs/s42/PLAN.txt): the pointing game's trials (``explain.pointing``: per study and
label with a lesion >= 10 mm, hit = the map's top token in a lesion of that label, ties share) scored
for the head-attention map, the token-probability map, and the token map fused across the study's
co-registered series: 0.5 * own + 0.5 * the mean over the OTHER series of the co-located token's value
(``probe.context.cross_series_mean``: nearest centre in world mm within 16 mm, ties averaged; no
partner: own value). One encoding per study; nothing is fitted. Prints hit rates per modality.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from neurovfm.analyze.config import AnalyzeConfig
from neurovfm.analyze.pipeline import Analyzer
from neurovfm.explain.maps import token_centres_ras
from neurovfm.explain.pointing import pointing_hit, pointing_trials, read_masked_study
from neurovfm.probe.context import CROSS_SERIES_MM, cross_series_mean
from neurovfm.tokens.cache import atomic_write_text


def fused(per_series_w: list[np.ndarray], centres: list[np.ndarray], own: float = 0.5) -> list[np.ndarray]:
    other = cross_series_mean([w.astype(np.float32) for w in per_series_w], centres,
                              list(range(len(per_series_w))), CROSS_SERIES_MM)
    return [own * w + (1 - own) * o for w, o in zip(per_series_w, other)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--min-size-mm", type=float, default=10.0)
    a = p.parse_args()
    records = [json.loads(x) for x in open(os.path.join(a.archive, "records.jsonl")) if x.strip()]
    an = Analyzer(a.model, AnalyzeConfig(maps="none"))
    todo = [r for r in records if r["split"] == a.split and r["modality"] in an.heads
            and any(f["size_mm"] >= a.min_size_mm and f["label"] in an.heads[r["modality"]][1]["labels"]
                    for f in r["findings"])]
    rows = []
    for r in tqdm(todo, desc="map fusion", unit="study", file=sys.stderr):
        group, ov = read_masked_study(a.archive, r, an.cfg)
        if not group:
            continue
        head = an.score(r["modality"], group, map_source="head")
        maps = {"head": head.per_series_w}
        tok = an.score(r["modality"], group, map_source="token", view_features=head.view_features)
        maps["token"] = tok.per_series_w
        centres = [token_centres_ras(s.ts.grid_affine, s.ts.coords) for s in group]
        maps["token_fused"] = fused(tok.per_series_w, centres)
        for trial in pointing_trials(r["findings"], ov, head.labels, a.min_size_mm):
            j = head.labels.index(trial["label"])
            row = {"patient": r["patient"], "modality": r["modality"], "label": trial["label"],
                   "n_series": len(group), "uniform_hit": float(trial["inside"].mean())}
            for name, m in maps.items():
                row[f"hit_{name}"] = pointing_hit(np.concatenate([w[:, j] for w in m]), trial["inside"])
            rows.append(row)
    summary = {}
    for mod in sorted({r["modality"] for r in rows}) + ["all"]:
        rs = [r for r in rows if mod in ("all", r["modality"])]
        summary[mod] = {"n_trials": len(rs), "n_patients": len({r["patient"] for r in rs}),
                        "uniform": float(np.mean([r["uniform_hit"] for r in rs])),
                        **{k: float(np.mean([r[f"hit_{k}"] for r in rs])) for k in ("head", "token", "token_fused")}}
        print(mod, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary[mod].items()}))
    atomic_write_text(a.out, json.dumps({"split": a.split, "model": an.model_info, "summary": summary, "trials": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
