"""Helpers for the analyze tests: a small model folder (untrained encoder and heads, for the
plumbing only: no test here claims anything about what a model has learned) and hand-made
studies on disk (real NIfTI / DICOM files)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import torch

from neurovfm.analyze.ood import fit_ood, save_ood
from neurovfm.eval.calibrate import PlattScaler
from neurovfm.models.config import encoder_config
from neurovfm.models.encoder import Encoder
from neurovfm.models.folder import make_provenance, save_encoder
from neurovfm.probe.heads import HeadConfig, build_head
from neurovfm.probe.train import save_head
from neurovfm.synth import tables


def make_model(folder: str, width: int = 48, depth: int = 2, heads: int = 2, seed: int = 0, ood: bool = True) -> str:
    torch.manual_seed(seed)
    enc = Encoder(encoder_config("tiny", width=width, depth=depth, heads=heads))
    save_encoder(enc, folder, provenance=make_provenance(command=["tests"], init={"kind": "random", "seed": seed}))
    rng = np.random.default_rng(seed)
    for mod in ("CT", "MR"):
        labels = tables.label_names(mod)
        hc = HeadConfig(kind="gated", attn_dim=16)
        head = build_head(hc, width, len(labels))
        cal = PlattScaler(np.ones(len(labels)), np.zeros(len(labels)))
        thr = {lab: float(rng.uniform(0.3, 0.7)) for lab in labels}
        save_head(folder, head, hc, labels, calibration=cal.to_dict(), thresholds=thr, name=f"head_{mod.lower()}")
        if ood:
            save_ood(folder, mod, fit_ood(rng.normal(size=(40, width)), rng.normal(size=(20, width)), k=8))
    return folder


def head_volume(shape=(96, 112, 80), spacing=(2.0, 2.0, 2.0), centre_mm=(0.0, 0.0, 0.0), lesion_side: str | None = "left",
                modality: str = "MR", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal 'head' in RAS-aligned voxel space (i = x toward Right, j = y toward Anterior,
    k = z toward Superior) with a bright lesion on one side; returns (volume, RAS affine)."""
    rng = np.random.default_rng(seed)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -np.array(shape) * np.array(spacing) / 2 + np.array(centre_mm)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x = aff[0, 0] * ii + aff[0, 3] - centre_mm[0]
    y = aff[1, 1] * jj + aff[1, 3] - centre_mm[1]
    z = aff[2, 2] * kk + aff[2, 3] - centre_mm[2]
    head = (x / 75) ** 2 + (y / 90) ** 2 + (z / 65) ** 2 <= 1
    brain = (x / 65) ** 2 + (y / 80) ** 2 + (z / 55) ** 2 <= 1
    if modality == "CT":
        vol = np.full(shape, -1000.0)
        vol[head] = 800.0
        vol[brain] = 35.0
        les_val = 75.0
    else:
        vol = np.zeros(shape)
        vol[head] = 300.0
        vol[brain] = 500.0
        les_val = 150.0  # dark (brain saturates the uint8 view), so the lesion is what stands out
    if lesion_side:
        lx = -35.0 if lesion_side == "left" else 35.0  # RAS: -x is the patient's left
        les = ((x - lx) / 14) ** 2 + ((y - 10) / 14) ** 2 + ((z - 5) / 14) ** 2 <= 1
        vol[les] = les_val
    vol = vol + rng.normal(0, 3.0, size=shape)
    return vol.astype(np.float32), aff


def reorient(vol: np.ndarray, aff: np.ndarray, plane: str) -> tuple[np.ndarray, np.ndarray]:
    """The same head stored as another acquisition: the slice (third) axis along x (sagittal), y
    (coronal) or z (axial), with a flipped in-plane axis so the voxel order is not RAS."""
    perm = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}[plane]
    v = np.transpose(vol, perm)
    a = np.eye(4)
    a[:3, :3] = aff[:3, :3][:, perm]
    a[:3, 3] = aff[:3, 3]
    # flip the first stored axis
    n0 = v.shape[0]
    v = v[::-1]
    a[:3, 3] = a[:3, 3] + a[:3, 0] * (n0 - 1)
    a[:3, 0] = -a[:3, 0]
    return np.ascontiguousarray(v), a


def write_nifti_study(folder: str, vol: np.ndarray, aff: np.ndarray, modality: str = "MR", name: str = "T1w",
                      sidecar: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"sub-01_{name}.nii.gz")
    nib.save(nib.Nifti1Image(vol, aff), path)
    sc = {"Modality": modality, **({"EchoTime": 0.01, "RepetitionTime": 0.5} if modality == "MR" else {})}
    sc.update(sidecar or {})
    with open(path[:-7] + ".json", "w") as fh:
        json.dump(sc, fh)
    return path
