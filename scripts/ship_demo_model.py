"""Copy a trained model folder into the package as the shipped demo model: weights in float16
(half the bytes; loading casts back to float32), the distance-to-training model kept in float32,
a ``demo`` section in config.json and a provenance record saying how it was made and how well
it did on the synthetic test split.

    python scripts/ship_demo_model.py MODEL DEST --eval EVAL/metrics.json --command "..."
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from neurovfm.models.folder import load_state, read_config, read_provenance, save_tensors, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dest")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--command", required=True)
    a = ap.parse_args()
    cfg = read_config(a.model)
    tmp = a.dest.rstrip("/") + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = ["encoder.safetensors"] + [h["file"] for h in cfg.get("heads", {}).values()]
    for f in files:
        st = load_state(os.path.join(a.model, f))
        save_tensors(os.path.join(tmp, f), {k: v.half() if v.is_floating_point() else v for k, v in st.items()},
                     metadata={"format": cfg["format"]})
    for o in cfg.get("ood", {}).values():
        shutil.copy(os.path.join(a.model, o["file"]), os.path.join(tmp, o["file"]))
    with open(a.eval) as fh:
        metrics = json.load(fh)
    perf = {}
    for name, mods in metrics["models"].items():
        for mod, entry in mods.items():
            perf[mod] = {"test_macro_auroc_headline": entry.get("macro_auroc"),
                         "headline_labels": entry.get("headline_labels"),
                         "test_studies": entry.get("test_studies"),
                         "headline_ece_after": entry.get("headline_ece_after")}
    cfg["demo"] = {"synthetic": True, "weights_dtype": "float16",
                   "note": "trained on neurovfm's synthetic archive only; research use, not a medical device"}
    write_json(os.path.join(tmp, "config.json"), cfg)
    prov = read_provenance(a.model)
    prov["demo_model"] = {"built_by": a.command, "data": "neurovfm synth --studies 300 --seed 0 (synthetic)",
                          "test_performance_synthetic": perf}
    write_json(os.path.join(tmp, "provenance.json"), prov)
    report = os.path.join(a.dest, "report")  # shipped separately (scripts/ship_report_model.py): keep it
    if os.path.isdir(report):
        shutil.copytree(report, os.path.join(tmp, "report"))
    shutil.rmtree(a.dest, ignore_errors=True)
    os.replace(tmp, a.dest)
    size = sum(os.path.getsize(os.path.join(a.dest, f)) for f in os.listdir(a.dest))
    print(f"{a.dest}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
