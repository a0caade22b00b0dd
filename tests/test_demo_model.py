"""The shipped demo model: present in the package, loads without --model, says what it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors import safe_open

from analyze_support import head_volume, write_nifti_study
from neurovfm.analyze.pipeline import Analyzer, default_model_path
from neurovfm.models.folder import read_config, read_provenance
from neurovfm.synth import tables


def test_demo_model_is_shipped_and_documented():
    folder = default_model_path()
    cfg = read_config(folder)
    assert cfg["demo"]["synthetic"] is True
    assert set(cfg["heads"]) == {"head_ct", "head_mr"}
    assert set(cfg["ood"]) == {"CT", "MR"}
    for mod in ("CT", "MR"):
        assert cfg["heads"][f"head_{mod.lower()}"]["labels"] == tables.label_names(mod)
    prov = read_provenance(folder)
    assert "train_demo_model.sh" in prov["demo_model"]["built_by"]
    assert prov["demo_model"]["test_performance_synthetic"]
    with safe_open(os.path.join(folder, "encoder.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    assert size < 15e6  # "a few MB" (the budget set in Plan M; the MRI head reads 960-wide features)


def test_analyze_uses_the_demo_model_by_default(tmp_path):
    vol, aff = head_volume(shape=(100, 120, 30), spacing=(1.6, 1.6, 5.0), modality="MR")
    study = write_nifti_study(str(tmp_path / "study"), vol, aff, "MR")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "neurovfm", "analyze", os.path.dirname(study), "--out", str(out),
                        "--quiet"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["model"]["name"] == "demo_model" and res["model"]["synthetic_training_data"] is True
    assert res["exams"][0]["modality"] == "MR"
    assert Analyzer().model == os.path.abspath(default_model_path())


def test_progress_is_reported_in_order(tmp_path):
    vol, aff = head_volume(shape=(100, 120, 30), spacing=(1.6, 1.6, 5.0), modality="CT")
    study = write_nifti_study(str(tmp_path / "study"), vol, aff, "CT")
    seen = []
    Analyzer().run(os.path.dirname(study), str(tmp_path / "out"), progress=lambda step, f: seen.append((step, f)))
    fractions = [f for _, f in seen]
    assert len(seen) >= 4 and fractions == sorted(fractions) and fractions[-1] >= 0.9
    assert any("CT" in step for step, _ in seen)
