"""Copy a trained model folder into the package as the shipped demo model: weights in float16
(half the bytes; loading casts back to float32), the distance-to-training model kept in float32,
a ``demo`` section in config.json and a provenance record saying how it was made and how well
it did on the synthetic test split.

    python scripts/ship_demo_model.py MODEL DEST --command "..." [--data "..."]
        [--heads CT=FOLDER MR=FOLDER] [--eval EVAL/metrics.json ...]

``--heads MOD=FOLDER`` takes modality MOD's head and distance-to-training model from FOLDER (an
``evaluate --save-model`` folder of the same encoder: one evaluation per modality, each with the
head kind chosen for it); the encoder weights must be the same, else the heads would read other
features. Without ``--eval`` (e.g. an encoder-only float16 copy to embed with) no test numbers
are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from neurovfm.errors import NeuroVFMError  # noqa: E402
from neurovfm.models.folder import load_state, read_config, read_provenance, save_tensors, write_json  # noqa: E402


def _half(st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in st.items()}


def _same_encoder(a: str, b: str) -> bool:
    ea, eb = load_state(os.path.join(a, "encoder.safetensors")), load_state(os.path.join(b, "encoder.safetensors"))
    return ea.keys() == eb.keys() and all(torch.equal(_half({"w": ea[k]})["w"], _half({"w": eb[k]})["w"]) for k in ea)


def main() -> int:
    try:
        return ship()
    except (NeuroVFMError, OSError, ValueError, KeyError) as e:  # a missing folder or file, a bad metrics file
        sys.exit(f"ship_demo_model.py: {type(e).__name__}: {e}")


def ship() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="model folder: the encoder (and any heads not replaced by --heads)")
    ap.add_argument("dest")
    ap.add_argument("--heads", nargs="*", default=[], metavar="MOD=FOLDER",
                    help="take modality MOD's head and distance model from FOLDER (same encoder)")
    ap.add_argument("--eval", nargs="*", default=[], help="metrics.json of the evaluations that fitted the heads")
    ap.add_argument("--data", default="neurovfm synth --studies 300 --seed 0 (synthetic)",
                    help="what the model was trained on, for the provenance record")
    ap.add_argument("--command", required=True)
    a = ap.parse_args()
    cfg = read_config(a.model)
    sources: dict[str, str] = {}  # file name -> folder it comes from
    for head in cfg.get("heads", {}).values():
        sources[head["file"]] = a.model
    for o in cfg.get("ood", {}).values():
        sources[o["file"]] = a.model
    for pair in a.heads:
        mod, _, folder = pair.partition("=")
        mod = mod.upper()
        if mod not in ("CT", "MR") or not folder:
            ap.error(f"--heads takes CT=FOLDER or MR=FOLDER, not {pair!r}")
        other = read_config(folder)
        if other["encoder"] != cfg["encoder"] or not _same_encoder(a.model, folder):
            ap.error(f"{folder}: its encoder is not {a.model}'s; its heads read other features")
        key = f"head_{mod.lower()}"
        if key not in other.get("heads", {}) or mod not in other.get("ood", {}):
            ap.error(f"{folder}: no {key} / {mod} distance model (an `evaluate --save-model` folder?)")
        cfg.setdefault("heads", {})[key] = other["heads"][key]
        cfg.setdefault("ood", {})[mod] = other["ood"][mod]
        sources[other["heads"][key]["file"]] = folder
        sources[other["ood"][mod]["file"]] = folder
    tmp = a.dest.rstrip("/") + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_tensors(os.path.join(tmp, "encoder.safetensors"), _half(load_state(os.path.join(a.model, "encoder.safetensors"))),
                 metadata={"format": cfg["format"]})
    for head in cfg.get("heads", {}).values():
        f = head["file"]
        save_tensors(os.path.join(tmp, f), _half(load_state(os.path.join(sources[f], f))), metadata={"format": cfg["format"]})
    for o in cfg.get("ood", {}).values():
        shutil.copy(os.path.join(sources[o["file"]], o["file"]), os.path.join(tmp, o["file"]))
    perf = {}
    for path in a.eval:
        with open(path) as fh:
            metrics = json.load(fh)
        for mods in metrics["models"].values():
            for mod, entry in mods.items():
                perf[mod] = {"test_macro_auroc_headline": entry.get("macro_auroc"),
                             "headline_labels": entry.get("headline_labels"),
                             "test_studies": entry.get("test_studies"),
                             "headline_ece_after": entry.get("headline_ece_after"),
                             "head": entry.get("head")}
            break  # the first model is the one whose heads were saved
    cfg["demo"] = {"synthetic": True, "weights_dtype": "float16",
                   "note": "trained on neurovfm's synthetic archive only; research use, not a medical device"}
    write_json(os.path.join(tmp, "config.json"), cfg)
    prov = read_provenance(a.model)
    prov["demo_model"] = {"built_by": a.command, "data": a.data, "test_performance_synthetic": perf}
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
