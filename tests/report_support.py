"""A tiny feature folder + keyed ground truth for report tests (no archive, no encoder)."""
from __future__ import annotations

import json
import os

import numpy as np

from neurovfm.probe.embed import FORMAT, FORMAT_VERSION, _part_dir, _write_part

DIM = 16
FINDINGS = [
    {"label": "acute_subdural_hematoma", "side": "left", "size_mm": 7.2, "acuity": "Urgent",
     "location": "left cerebral convexity"},
    {"label": "cerebral_atrophy", "side": "bilateral", "size_mm": 0.0, "acuity": "Routine", "location": "diffuse"},
    {"label": "intraparenchymal_hemorrhage", "side": "right", "size_mm": 14.0, "acuity": "Urgent",
     "location": "right frontal lobe"},
]


def write_world(root: str, n_studies: int = 6, seed: int = 0, dim: int = DIM) -> dict[str, str]:
    """Features where a study's first token dimension carries which findings it has, and a keyed
    findings file with train/val/test splits."""
    rng = np.random.default_rng(seed)
    rows, feats, recs = [], [], []
    off = 0
    for i in range(n_studies):
        sk = f"study{i:03d}"
        mod = "CT" if i % 2 == 0 else "MR"
        fs = [FINDINGS[j] for j in range(len(FINDINGS)) if (i >> j) & 1]
        for v in range(2):
            n = int(rng.integers(5, 12))
            f = rng.normal(size=(n, dim)).astype(np.float16)
            f[:, 0] = len(fs)
            feats.append(f)
            rows.append({"series_key": f"{sk}s{v}", "study_key": sk, "modality": mod,
                         "view": "brain" if mod == "CT" else "mr", "offset": off, "n_tokens": n})
            off += n
        split = "train" if i < n_studies - 2 else ("val" if i == n_studies - 2 else "test")
        recs.append({"study_key": sk, "patient_key": f"pat{i // 2}", "split": split, "modality": mod,
                     "indication": "Headache.", "findings": fs, "labels": [f["label"] for f in fs],
                     "triage": "Urgent" if any(f["acuity"] == "Urgent" for f in fs) else ("Routine" if fs else "Normal"),
                     "report": {"impression": "1. Something.\n2. Other thing."}})
    out = os.path.join(root, "features")
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    allf = np.concatenate(feats)
    _write_part(_part_dir(out, 0), allf, np.zeros((len(allf), 3), np.int16), np.zeros(len(allf), np.int8), rows)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": dim, "n_parts": 1, "encoder_id": "test",
            "cache_schema_hash": "x", "policy_hash": "x", "plan_hash": "x"}
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump(meta, fh)
    path = os.path.join(root, "findings_keyed.jsonl")
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    return {"features": out, "findings": path}
