"""Beam search vs greedy decoding of the report model, side by side on the same test studies.

Greedy reports come from `neurovfm report-eval` (its reports_image.jsonl); this script writes
beam-search reports for the first N test studies (by key; resumable) with the same model and
grammar, then compares finding-level F1 (paired patient bootstrap), findings per report and
seconds per study.

    python bench/report/beam_vs_greedy.py --image-model RUN_A/model --features FEATS \\
        --findings KEYED.jsonl --greedy EVAL/reports_image.jsonl --out bench/results/report_beam3_vs_greedy.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from neurovfm.report.data import build_examples  # noqa: E402
from neurovfm.report.evaluation import paired_f1_bootstrap, report_metrics, study_counts  # noqa: E402
from neurovfm.report.experiment import _clean, _done_keys, generate_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-model", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--findings", required=True)
    ap.add_argument("--greedy", required=True, help="reports_image.jsonl of `neurovfm report-eval` (greedy)")
    ap.add_argument("--llm")
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    keys = [e.study_key for e in build_examples(a.findings, a.features, ("test",))][: a.n]
    beam_path = os.path.splitext(a.out)[0] + f"_beam{a.beams}_reports.jsonl"
    generate_split(a.image_model, a.features, a.findings, beam_path, splits=("test",), num_beams=a.beams,
                   llm=a.llm, keys=set(keys))
    truth = {json.loads(line)["study_key"]: json.loads(line) for line in open(a.findings) if line.strip()}
    B, G = _done_keys(beam_path), _done_keys(a.greedy)
    missing = [k for k in keys if k not in G]
    if missing:
        sys.exit(f"{a.greedy}: no greedy report for {len(missing)} of the studies; run `neurovfm report-eval` first")
    cb = [study_counts(B[k]["report"], truth[k]) for k in keys]
    cg = [study_counts(G[k]["report"], truth[k]) for k in keys]
    res = {"command": " ".join(sys.argv), "n_studies": len(keys), "beams": a.beams,
           "beam": report_metrics(cb), "greedy": report_metrics(cg),
           "beam_seconds_per_study": float(np.mean([B[k]["seconds"] for k in keys])),
           "greedy_seconds_per_study": float(np.mean([G[k]["seconds"] for k in keys])),
           "beam_findings_per_report": float(np.mean([len(B[k]["report"]["findings"]) for k in keys])),
           "greedy_findings_per_report": float(np.mean([len(G[k]["report"]["findings"]) for k in keys])),
           "paired_f1_beam_minus_greedy": paired_f1_bootstrap(cb, cg, [truth[k].get("patient_key", k) for k in keys])}
    res["seconds_ratio_beam_over_greedy"] = res["beam_seconds_per_study"] / res["greedy_seconds_per_study"]
    with open(a.out, "w") as fh:
        json.dump(_clean(res), fh, indent=1)
    d = res["paired_f1_beam_minus_greedy"]
    print(f"{len(keys)} test studies: F1 beam {res['beam']['f1']:.3f} vs greedy {res['greedy']['f1']:.3f} "
          f"(paired {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]); findings/report "
          f"{res['beam_findings_per_report']:.1f} vs {res['greedy_findings_per_report']:.1f}; "
          f"time {res['seconds_ratio_beam_over_greedy']:.1f}x greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
