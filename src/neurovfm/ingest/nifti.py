"""NIfTI files (.nii, .nii.gz; NIfTI-1 and -2) as plane stacks, with modality from a sidecar.

Modality and sequence come from a BIDS-style JSON sidecar beside the file (``Modality``,
the filename suffix such as ``_T1w``/``_FLAIR``/``_dwi``, ``ContrastBolusIngredient``,
``ConvolutionKernel``, timing in seconds), else from the caller's ``--modality``, else the
file is refused: the same rule wherever a study is read. The affine is nibabel's best
(sform, then qform). A 4-D file becomes one series per volume only when the fourth axis
repeats one contrast (no ``.bval`` beside it, no differing echo times), at most
``policy.max_4d_volumes`` evenly spaced volumes; otherwise it is refused with a reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from neurovfm.errors import IngestError
from neurovfm.ingest.classify import SeriesClass, ct_kernel, mr_sequence
from neurovfm.ingest.geometry import StackGeometry
from neurovfm.ingest.policy import PreprocessPolicy

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_BIDS_SEQ = {
    "t1w": "T1", "t2w": "T2", "flair": "FLAIR", "dwi": "DWI", "adc": "ADC", "t2starw": "SWI", "swi": "SWI",
    "pdw": "PD", "pd": "PD", "t1": "T1", "t2": "T2", "t2star": "SWI", "ct": None,
}


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def sidecar_path(path: str) -> str:
    base = path[:-7] if path.lower().endswith(".nii.gz") else path[:-4]
    return base + ".json"


def read_sidecar(path: str) -> dict:
    sc = sidecar_path(path)
    if not os.path.exists(sc):
        return {}
    try:
        with open(sc, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise IngestError("bad_sidecar", f"sidecar JSON cannot be parsed ({type(exc).__name__})", sc) from None
    if not isinstance(data, dict):
        raise IngestError("bad_sidecar", "sidecar JSON is not an object", sc)
    return data


def bids_entities(path: str) -> tuple[dict[str, str], str]:
    name = os.path.basename(path)
    name = name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]
    parts = name.split("_")
    ents = {}
    for p in parts[:-1]:
        if "-" in p:
            k, v = p.split("-", 1)
            ents[k.lower()] = v
    suffix = parts[-1].lower() if parts else ""
    return ents, suffix


def classify_nifti(path: str, sidecar: dict, modality_hint: str | None) -> SeriesClass:
    """Modality and sequence of a NIfTI file, or a refusal naming the file."""
    ents, suffix = bids_entities(path)
    mod = str(sidecar.get("Modality", "")).upper()
    if mod in ("MRI",):
        mod = "MR"
    if not mod and modality_hint:
        mod = {"ct": "CT", "mr": "MR", "mri": "MR"}.get(modality_hint.lower(), "")
    if not mod and suffix == "ct":
        mod = "CT"
    if mod not in ("CT", "MR"):
        raise IngestError(
            "unknown_modality",
            "modality unknown: no BIDS sidecar JSON with Modality beside the file and no --modality given"
            if not mod else f"modality {mod} is not CT or MR",
            path,
        )
    desc = " ".join(str(sidecar.get(k, "")) for k in ("SeriesDescription", "ProtocolName")).lower()
    if mod == "CT":
        kernel = ct_kernel(str(sidecar.get("ConvolutionKernel", "")), desc, None)
        contrast = bool(sidecar.get("ContrastBolusIngredient")) or "ce" in ents
        return SeriesClass("CT", "", kernel, contrast)
    seq = _BIDS_SEQ.get(suffix)
    contrast = bool(sidecar.get("ContrastBolusIngredient")) or "ce" in ents
    if seq is None:
        def ms(key: str):
            v = sidecar.get(key)
            try:
                return float(v) * 1000.0 if v is not None else None
            except (TypeError, ValueError):
                return None
        it = sidecar.get("ImageType") or []
        seq = mr_sequence(desc, tuple(str(t).upper() for t in it), sidecar.get("DiffusionBValue"),
                          ms("RepetitionTime"), ms("EchoTime"), ms("InversionTime"),
                          "yes" if contrast else "", "", str(sidecar.get("PulseSequenceDetails", "")))
    if seq == "T1" and contrast:
        seq = "T1C"
    return SeriesClass("MR", seq, "", contrast)


@dataclass
class NiftiStack:
    """A :class:`PlaneSource` over one 3-D NIfTI volume (planes along the third axis)."""

    data: np.ndarray
    geometry: StackGeometry

    def plane(self, k: int) -> np.ndarray:
        return np.ascontiguousarray(self.data[:, :, k], dtype=np.float32)


def open_nifti(path: str, policy: PreprocessPolicy) -> list[NiftiStack]:
    """Load and validate a NIfTI file; one stack per 3-D volume (see the module doc)."""
    try:
        img = nib.load(path)
    except Exception as exc:
        raise IngestError("unreadable", f"NIfTI cannot be read ({type(exc).__name__}: {str(exc)[:80]})", path) from None
    shape = tuple(int(s) for s in img.shape)
    dtype = img.get_data_dtype()
    if dtype.names is not None or dtype.kind not in "biuf":
        raise IngestError("colour", f"non-scalar voxel type {dtype} (RGB or complex)", path)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise IngestError("not_3d", f"image has shape {shape}, need a 3-D volume", path)
    if len(shape) > 4:
        raise IngestError("not_3d", f"{len(shape)}-D image is not supported", path)
    if min(shape[:3]) <= 0:
        raise IngestError("bad_dimensions", f"zero dimension in shape {shape}", path)
    if max(shape[:3]) > max(policy.max_inplane_voxels, policy.max_slices):
        raise IngestError("too_large", f"shape {shape} exceeds the size cap", path)
    n_vol = shape[3] if len(shape) == 4 else 1
    if np.prod(shape[:3]) * 4 > policy.max_raw_bytes:
        raise IngestError("too_large", f"shape {shape} exceeds the memory cap", path)
    if n_vol > 1:
        base = path[:-7] if path.lower().endswith(".nii.gz") else path[:-4]
        if os.path.exists(base + ".bval"):
            raise IngestError("mixed_4d", "4-D file with b-values: volumes are different contrasts; split it into one file per contrast", path)
        sc = read_sidecar(path)
        if isinstance(sc.get("EchoTime"), list) and len(set(sc["EchoTime"])) > 1:
            raise IngestError("mixed_4d", "4-D file with several echo times; split it into one file per contrast", path)
    aff = np.asarray(img.affine, float)
    if not np.all(np.isfinite(aff)):
        raise IngestError("bad_geometry", "affine has non-finite values", path)
    cols = aff[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 1e-6) or np.any(spacing > 50):
        raise IngestError("bad_geometry", f"implausible voxel sizes {tuple(round(float(v), 3) for v in spacing)} mm", path)
    dirs = cols / spacing
    gram = dirs.T @ dirs
    if np.abs(gram - np.eye(3)).max() > 1e-2:
        raise IngestError("sheared_affine", "affine has shear (axes not orthogonal); resample it to an orthogonal grid first", path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise IngestError("unreadable", f"voxel data cannot be read ({type(exc).__name__})", path) from None
    data = data.reshape(shape)
    if n_vol > 1:
        picks = np.unique(np.linspace(0, n_vol - 1, min(n_vol, policy.max_4d_volumes)).round().astype(int))
    else:
        picks = np.array([0])
        data = data[..., None]
    stacks = []
    for v in picks:
        vol = np.asarray(data[..., int(v)], dtype=np.float32)
        bad = ~np.isfinite(vol)
        if bad.any():
            raise IngestError("non_finite", f"{int(bad.sum())} voxels are NaN or infinite", path)
        geom = StackGeometry(
            shape=vol.shape, spacing_ij=(float(spacing[0]), float(spacing[1])),
            dir_i=dirs[:, 0], dir_j=dirs[:, 1], normal=dirs[:, 2], origin=aff[:3, 3],
            positions=np.arange(vol.shape[2]) * float(spacing[2]), acquisition_axis=int(np.argmax(spacing)),
        )
        stacks.append(NiftiStack(vol, geom))
    return stacks
