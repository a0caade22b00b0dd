"""`neurovfm analyze` end to end on CPU: one CT study with ViT-B (target: under 60 s from DICOM
to result.json, no report) and a 10-series MRI study (target: peak memory under 3 GB), each in
a fresh process so the peak resident memory is the command's own. Maps cost is shown side by
side (``--maps none`` against the default top-3). Weights are random: speed and memory do not
depend on what a model has learned.

    python bench/analyze/bench_analyze.py --archive ARCHIVE [--size base] [--out bench/results/analyze_cpu.json]

ARCHIVE is a `neurovfm synth` archive (records.jsonl + dicom/); the CT study is its first CT
study, the MRI study is built by copying the series of its first MR studies until there are 10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

from neurovfm.analyze.pipeline import set_map_source
from neurovfm.eval.calibrate import PlattScaler
from neurovfm.models.config import encoder_config
from neurovfm.models.encoder import Encoder
from neurovfm.models.folder import make_provenance, save_encoder
from neurovfm.probe.context import CROSS_SERIES_MM
from neurovfm.probe.embed import HistogramFeaturizer, encoder_id
from neurovfm.probe.heads import HeadConfig, build_head
from neurovfm.probe.train import save_head
from neurovfm.synth import tables

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from neurovfm.analyze.config import AnalyzeConfig
from neurovfm.analyze.pipeline import analyze
study, model, out, maps = sys.argv[1:5]
res = analyze(study, out, model=model, cfg=AnalyzeConfig(maps=maps))
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "timings_s": res["timings_s"], "n_series": sum(len(e["series"]) for e in res["exams"]),
                  "n_tokens": sum(e["n_tokens"] for e in res["exams"])}))
"""


def build_model(folder: str, size: str, recipe: str = "plain") -> str:
    """plain: gated heads on the encoder's tokens. shipped: the demo model's recipe (32-bin histograms
    and the 3x3x3 neighbourhood appended; CT ABMIL, MRI top-k that also reads the co-located tokens of
    the study's other series and draws token maps fused across them)."""
    torch.manual_seed(0)
    enc = Encoder(encoder_config(size))
    save_encoder(enc, folder, provenance=make_provenance(command=sys.argv, init={"kind": "random", "seed": 0}))
    base = enc.cfg.width + (HistogramFeaturizer(32).dim if recipe == "shipped" else 0)
    for mod in ("CT", "MR"):
        labels = tables.label_names(mod)
        if recipe == "plain":
            hc, dim, feats = HeadConfig(kind="gated"), enc.cfg.width, None
        else:
            feats = {"encoder_id": encoder_id(folder), "readout_layers": None, "histogram_bins": 32, "context_radius": 1}
            if mod == "MR":
                feats["cross_series_mm"] = CROSS_SERIES_MM
            hc = HeadConfig(kind="abmil" if mod == "CT" else "topk")
            dim = base * (3 if mod == "MR" else 2)
        head = build_head(hc, dim, len(labels))
        save_head(folder, head, hc, labels, calibration=PlattScaler(np.ones(len(labels)), np.zeros(len(labels))).to_dict(),
                  thresholds={lab: 0.5 for lab in labels}, name=f"head_{mod.lower()}", features=feats)
    if recipe == "shipped":
        set_map_source(folder, "MR", "token-fused")
    return folder


def pick_studies(archive: str, work: str) -> tuple[str, str]:
    with open(os.path.join(archive, "records.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    ct = next(r for r in recs if r["modality"] == "CT")
    ct_dir = os.path.join(archive, os.path.dirname(ct["series"][0]["path"]))
    mr_dir = os.path.join(work, "mr10")
    os.makedirs(mr_dir)
    n = 0
    for r in (r for r in recs if r["modality"] == "MR"):
        for s in r["series"]:
            shutil.copytree(os.path.join(archive, s["path"]), os.path.join(mr_dir, f"SE{n:03d}"))
            n += 1
            if n == 10:
                return ct_dir, mr_dir
    raise SystemExit("archive has fewer than 10 MR series")  # pragma: no cover


def run_child(study: str, model: str, out: str, maps: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    p = subprocess.run([sys.executable, "-c", CHILD, study, model, out, maps], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", required=True)
    ap.add_argument("--size", default="base")
    ap.add_argument("--out", default="bench/results/analyze_cpu.json")
    ap.add_argument("--shipped-recipe", action="store_true",
                    help="also time the demo model's recipe (histograms, neighbourhood, cross-series, fused maps) "
                         "side by side with plain gated heads")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = build_model(os.path.join(work, "model"), a.size)
        ct, mr = pick_studies(a.archive, work)
        res = {}
        runs = [(name, study, maps, model, "") for name, study in (("ct", ct), ("mr10", mr)) for maps in ("none", "top-k")]
        if a.shipped_recipe:
            shipped = build_model(os.path.join(work, "model_shipped"), a.size, "shipped")
            runs += [(name, study, "top-k", shipped, "_shipped_recipe") for name, study in (("ct", ct), ("mr10", mr))]
        for name, study, maps, m, tag in runs:
            r = run_child(study, m, os.path.join(work, f"out-{name}-{maps}{tag}"), maps)
            res[f"{name}_{maps}{tag}"] = r
            print(f"{name:5s} maps={maps:6s}{tag:16s} {r['n_series']:2d} series {r['n_tokens']:6d} tokens  "
                  f"{r['wall_s']:6.1f} s  peak {r['peak_rss_gib']:.2f} GiB  {r['timings_s']}")
    ct_t = res["ct_top-k"]["wall_s"]
    mr_m = res["mr10_top-k"]["peak_rss_gib"]
    summary = {
        "ct_seconds_vs_60s_target": round(ct_t / 60.0, 3),
        "mr10_peak_gib_vs_3gb_target": round(mr_m / (3e9 / 2**30), 3),
        "maps_cost_ratio_ct": round(ct_t / res["ct_none"]["wall_s"], 3),
        "maps_cost_ratio_mr10": round(res["mr10_top-k"]["wall_s"] / res["mr10_none"]["wall_s"], 3),
    }
    print(f"CT {a.size}: {ct_t:.1f} s = {summary['ct_seconds_vs_60s_target']:.2f} x the 60 s target "
          f"({'met' if ct_t < 60 else 'MISSED'});  10-series MRI peak {mr_m:.2f} GiB = "
          f"{summary['mr10_peak_gib_vs_3gb_target']:.2f} x the 3 GB target ({'met' if mr_m < 3e9 / 2**30 else 'MISSED'})")
    print(f"maps (top-3) cost: CT x{summary['maps_cost_ratio_ct']}, MRI x{summary['maps_cost_ratio_mr10']} over --maps none")
    if a.shipped_recipe:
        for name in ("ct", "mr10"):
            x = res[f"{name}_top-k_shipped_recipe"]
            summary[f"{name}_shipped_recipe_time_ratio"] = round(x["wall_s"] / res[f"{name}_top-k"]["wall_s"], 3)
            summary[f"{name}_shipped_recipe_peak_ratio"] = round(x["peak_rss_gib"] / res[f"{name}_top-k"]["peak_rss_gib"], 3)
        print(f"shipped recipe vs plain gated heads (top-3 maps): CT time x{summary['ct_shipped_recipe_time_ratio']}, "
              f"MRI time x{summary['mr10_shipped_recipe_time_ratio']}, MRI peak x{summary['mr10_shipped_recipe_peak_ratio']} "
              f"({res['mr10_top-k_shipped_recipe']['peak_rss_gib']:.2f} GiB)")
    out = {"command": " ".join(sys.argv), "size": a.size, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "torch": torch.__version__, "runs": res, "summary": summary}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
