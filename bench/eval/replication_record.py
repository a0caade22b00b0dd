"""One record of a seed replication (bench/eval/seed_replication.sh OUT), for bench/results/.

Reads what the replication wrote and nothing else, so the record reproduces from the script's
command: each pretraining run's curve summary (OUT/pt_sS/metrics.csv), each model's test macro
AUROC with its patient-bootstrap interval, head and headline ECE (OUT/eval_*/metrics.json), and
every comparison of OUT/pooled.json with the decision rule's verdict per modality.

    python bench/eval/replication_record.py OUT [--data DATA] [--out RECORD.json]

A replication of a pretraining variant (OUT/settings.json with a non-empty PRETRAIN_SET) is recorded
with that setting in its command, and every seed's summary carries the optimiser settings its model
was trained with (from the model folder's provenance), so a record says which loss it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

import numpy as np


def pretraining_summary(metrics_csv: str, late_from: int = 600) -> dict:
    """Loss at the start and the end (100-step means) and the collapse monitors from ``late_from``
    on (effective rank, predictor cosine): the same summary as the earlier pretraining records."""
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{metrics_csv}: no training steps")
    loss = np.array([float(r["loss"]) for r in rows])
    mon = [r for r in rows if r.get("erank") and int(r["step"]) >= late_from]

    def mean(key: str) -> float | None:
        return round(float(np.mean([float(r[key]) for r in mon])), 3) if mon else None

    return {"steps": int(rows[-1]["step"]), "loss_first_100_mean": round(float(loss[:100].mean()), 4),
            "loss_last_100_mean": round(float(loss[-100:].mean()), 4),
            f"erank_mean_steps_{late_from}_plus": mean("erank"), f"cosine_mean_steps_{late_from}_plus": mean("cosine")}


def model_summary(metrics_json: str) -> dict:
    """Per modality: test macro AUROC [interval], the head chosen on validation, its seeds' spread,
    headline ECE before/after calibration and how many studies and labels were scored."""
    with open(metrics_json) as fh:
        models = json.load(fh)["models"]
    out = {}
    for name, per_mod in models.items():
        out[name] = {}
        for mod, e in per_mod.items():
            auc = e.get("macro_auroc") or {}
            members = e.get("head_members") or {}
            out[name][mod] = {"macro_auroc": auc.get("estimate"), "low": auc.get("low"), "high": auc.get("high"),
                              "head": e.get("head"), "head_seed_range": members.get("member_range"),
                              "headline_ece_before": e.get("headline_ece_before"),
                              "headline_ece_after": e.get("headline_ece_after"),
                              "headline_labels": len(e.get("headline_labels") or []), "test_studies": e.get("test_studies")}
    return out


def _named(path: str, read):
    """``read(path)``, with any failure (missing, not JSON/CSV, not the expected shape) as one
    ValueError that names the file."""
    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: {e!r}") from None


def _json(path: str):
    with open(path) as fh:
        return json.load(fh)


def _optim_of(provenance: str) -> dict:
    """{"optim": the optimiser settings the model was trained with}, or {} without a model folder."""
    if not os.path.exists(provenance):
        return {}
    return {"optim": _named(provenance, lambda p: _json(p)["training"]["config"]["optim"])}


def build(out_dir: str, data: str = "DATA") -> dict:
    pooled = _named(os.path.join(out_dir, "pooled.json"), _json)
    if not isinstance(pooled, dict) or not isinstance(pooled.get("comparisons"), dict):
        raise ValueError(f"{os.path.join(out_dir, 'pooled.json')}: not paired_from_predictions.py output")
    pooled_keys = [k for k in pooled["comparisons"] if k.startswith("mean(")]
    if not pooled_keys:
        raise ValueError("pooled.json has no pooled (replicate) comparison")
    # the seeds the replication compared (not whatever else OUT holds): ref_sS in the pooled key
    seeds = sorted({int(s) for k in pooled_keys for s in re.findall(r"\bref_s(\d+)\b", k)})
    models: dict = {}
    for name in ["histogram", *(f"{k}_s{s}" for s in seeds for k in ("ref", "random"))]:
        models.update(_named(os.path.join(out_dir, f"eval_{name}", "metrics.json"), model_summary))
    settings_path = os.path.join(out_dir, "settings.json")
    settings = _named(settings_path, _json) if os.path.exists(settings_path) else {"pretrain_set": ""}
    if not isinstance(settings, dict) or not isinstance(settings.get("pretrain_set"), str):
        raise ValueError(f"{settings_path}: not seed_replication.sh settings")
    env = f"PRETRAIN_SET='{settings['pretrain_set']}' " if settings["pretrain_set"] else ""
    verdicts = {key: {mod: r["verdict"] for mod, r in comp.items()}
                for key, comp in pooled["comparisons"].items() if key in pooled_keys}
    return {
        "command": f"{env}bench/eval/seed_replication.sh {data} OUT \"{' '.join(map(str, seeds))}\"; "
                   "python bench/eval/replication_record.py OUT",
        "protocol": "fixed before the first result (header of bench/eval/seed_replication.sh): per modality, mean "
                    "test macro AUROC of the pretrained seeds minus that of the random-init seeds; pretraining "
                    "helps only if both the patient-bootstrap and the seed-level t interval lie above zero",
        "seeds": seeds,
        "pretrain_set": settings["pretrain_set"],
        "verdict": verdicts,
        "pretraining": {f"seed{s}": {**_named(os.path.join(out_dir, f"pt_s{s}", "metrics.csv"), pretraining_summary),
                                     **_optim_of(os.path.join(out_dir, f"pt_s{s}", "model", "provenance.json"))}
                        for s in seeds},
        "models": models,
        "comparisons": pooled["comparisons"],
        "bootstrap": pooled.get("bootstrap"), "bootstrap_seed": pooled.get("seed"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="the OUT folder of bench/eval/seed_replication.sh")
    ap.add_argument("--data", default="DATA", help="how to name the archive folder in the recorded command")
    ap.add_argument("--out", help="write the record here (default: print it)")
    a = ap.parse_args()
    try:
        rec = build(a.out_dir, a.data)
    except (ValueError, KeyError) as e:
        sys.exit(f"replication_record: {a.out_dir} is not a finished seed replication ({e})")
    text = json.dumps(rec, indent=1)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, a.out)
    print(text)


if __name__ == "__main__":
    main()
