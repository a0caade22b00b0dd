"""scripts/ship_demo_model.py: the shipped folder takes each modality's head from the evaluation that
fitted it, in float16, and refuses heads fitted on another encoder's features."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from analyze_support import make_model
from neurovfm.analyze.ood import fit_ood, save_ood
from neurovfm.eval.calibrate import PlattScaler
from neurovfm.models.folder import load_state, read_config
from neurovfm.probe.heads import HeadConfig, build_head
from neurovfm.probe.train import load_head, save_head
from neurovfm.synth import tables

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ship_demo_model.py")


def _ship(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def _refit_mr(folder: str, width: int = 48) -> None:
    """Replace the MR head and distance model with other ones (a top-k head), as an MR-only
    `evaluate --save-model` into a copy of the encoder folder would."""
    torch.manual_seed(7)
    labels = tables.label_names("MR")
    hc = HeadConfig(kind="topk", top_k=3)
    save_head(folder, build_head(hc, width, len(labels)), hc, labels,
              calibration=PlattScaler(np.full(len(labels), 2.0), np.zeros(len(labels))).to_dict(),
              thresholds={lab: 0.5 for lab in labels}, name="head_mr")
    rng = np.random.default_rng(7)
    save_ood(folder, "MR", fit_ood(rng.normal(size=(40, width)), rng.normal(size=(20, width)), k=8))


def test_heads_are_taken_per_modality_in_float16(tmp_path):
    base = make_model(str(tmp_path / "base"), seed=0)
    mr = str(tmp_path / "mr")
    shutil.copytree(base, mr)
    _refit_mr(mr)
    dest = str(tmp_path / "dest")
    os.makedirs(os.path.join(dest, "report"))
    (tmp_path / "dest" / "report" / "keep.json").write_text("{}")
    p = _ship(base, dest, "--heads", f"MR={mr}", "--command", "scripts/train_demo_model.sh W", "--data", "synthetic")
    assert p.returncode == 0, p.stderr
    cfg = read_config(dest)
    assert cfg["heads"]["head_mr"]["head"]["kind"] == "topk" and cfg["heads"]["head_ct"]["head"]["kind"] == "gated"
    assert cfg["ood"]["MR"] == read_config(mr)["ood"]["MR"] and cfg["ood"]["CT"] == read_config(base)["ood"]["CT"]
    for name, src in (("head_mr", mr), ("head_ct", base), ("encoder", base)):
        got, want = load_state(os.path.join(dest, f"{name}.safetensors")), load_state(os.path.join(src, f"{name}.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == torch.float16
            assert torch.equal(got[k], want[k].half()), (name, k)
    head, meta = load_head(dest, "head_mr")  # loads back as a working head
    assert meta["labels"] == tables.label_names("MR") and isinstance(head, torch.nn.Module)
    assert os.path.isfile(os.path.join(dest, "report", "keep.json"))  # the report model is kept
    prov = json.loads((tmp_path / "dest" / "provenance.json").read_text())
    assert prov["demo_model"]["built_by"] == "scripts/train_demo_model.sh W" and prov["demo_model"]["data"] == "synthetic"
    assert cfg["demo"]["synthetic"] is True


def test_heads_of_another_encoder_are_refused(tmp_path):
    base = make_model(str(tmp_path / "base"), seed=0)
    other = make_model(str(tmp_path / "other"), seed=1)  # same architecture, other weights
    dest = tmp_path / "dest"
    p = _ship(base, str(dest), "--heads", f"MR={other}", "--command", "x")
    assert p.returncode != 0 and "other" in p.stderr and "encoder" in p.stderr
    assert not dest.exists()
    p = _ship(base, str(dest), "--heads", f"PET={other}", "--command", "x")
    assert p.returncode != 0 and "PET" in p.stderr


def test_missing_inputs_are_named_and_leave_the_shipped_folder_alone(tmp_path):
    base = make_model(str(tmp_path / "base"), seed=0)
    dest = tmp_path / "dest"
    assert _ship(base, str(dest), "--command", "x").returncode == 0
    before = {n: (dest / n).read_bytes() for n in os.listdir(dest)}
    missing = str(tmp_path / "no_such_heads")
    p = _ship(base, str(dest), "--heads", f"MR={missing}", "--command", "x")
    assert p.returncode != 0 and "no_such_heads" in p.stderr and "Traceback" not in p.stderr
    p = _ship(base, str(dest), "--eval", str(tmp_path / "no_metrics.json"), "--command", "x")
    assert p.returncode != 0 and "no_metrics.json" in p.stderr and "Traceback" not in p.stderr
    assert {n: (dest / n).read_bytes() for n in os.listdir(dest)} == before  # the shipped folder is untouched
