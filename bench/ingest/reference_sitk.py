"""Reference ingestion pipeline built from SimpleITK (the baseline of bench_ingest.py).

It follows the reference NeuroVFM preprocessing step by step:

    ImageSeriesReader (GDCM, files of the series found by GetGDCMSeriesFileNames)
    -> DICOMOrient(img, "RPI")
    -> slice axis by the reference rule on the RPI sizes and spacings
    -> Resample with sitkBSpline to 1 mm in-plane and 4 mm along the slice axis
       (origin and direction of the oriented image, size int(n * spacing / target) per axis)
    -> centre crop with Extract: start (n % m) // 2, size (n // m) * m (m = 4 slice axis, 16 else)
    -> numpy [D, H, W] in the reference layout (slice axis first)
    -> CT: brain / blood / bone uint8 windows, foreground HU > -500
       MR: 0.5-99.5 percentile scaling to uint8, foreground > 10th percentile
    -> 4 x 16 x 16 tokens, background tokens (any background voxel) removed.

The resampler writes float32 (``outputPixelType=sitkFloat32``; ITK interpolates in double
either way). Resampling straight into the input's int16 type would truncate every value to
a whole HU, about 1.5 brain-window levels of error by itself, which is a property of that
cast rather than of the interpolator; see README.md.

SimpleITK's thread count is left at its default (all cores), see ``sitk_threads()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from neurovfm.ingest.geometry import LAYOUT, reference_slice_axis
from neurovfm.tokens.patches import patchify, token_foreground

INPLANE_MM = 1.0
SLICE_MM = 4.0
PATCH = (4, 16, 16)
# (name, width, level) in HU
CT_WINDOWS = (("brain", 80.0, 40.0), ("blood", 200.0, 80.0), ("bone", 2800.0, 600.0))
CT_BACKGROUND_HU = -500.0
MR_CLIP_PCT = (0.5, 99.5)
MR_BACKGROUND_PCT = 10.0

# sitk.GetArrayFromImage gives [z, y, x]; this is the transpose to [D, H, W] per slice axis
_TO_LAYOUT = {2: (0, 1, 2), 1: (1, 0, 2), 0: (2, 1, 0)}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def sitk_threads() -> int:
    return int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())


@dataclass
class ReferenceResult:
    volume: np.ndarray  # float32 [D, H, W]
    affine: np.ndarray  # voxel -> RAS, columns in our [D, H, W] order
    slice_axis: int  # world axis (0 x, 1 y, 2 z)
    views: dict[str, np.ndarray]  # uint8 [D, H, W] per view
    tokens: np.ndarray  # uint8 [n, n_views, 1024]
    coords: np.ndarray  # int16 [n, 3]
    timings: dict[str, float] = field(default_factory=dict)


def _window_u8(vol: np.ndarray, width: float, level: float) -> np.ndarray:
    lower = np.float32(level - width / 2.0)
    x = (vol - lower) * np.float32(255.0 / width)
    np.clip(x, 0, 255, out=x)
    return np.rint(x).astype(np.uint8)


def _percentile_u8(vol: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    lo, hi = np.percentile(vol, [lo_pct, hi_pct])
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(vol.shape, np.uint8)
    x = (np.clip(vol, lo, hi) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(x).astype(np.uint8)


def sitk_affine_ras(img: sitk.Image, slice_axis: int) -> np.ndarray:
    """Voxel -> RAS affine of an sitk image, columns permuted to the [D, H, W] layout.

    The image must be RPI-oriented (its index axes follow world x, y, z), as after
    DICOMOrient; then array axis a of the [D, H, W] layout is sitk index axis LAYOUT[s][a].
    """
    direction = np.array(img.GetDirection(), float).reshape(3, 3)  # columns: index axes, LPS
    spacing = np.array(img.GetSpacing(), float)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = img.GetOrigin()
    ras = np.eye(4)
    ras[:3, :] = _LPS_TO_RAS @ lps[:3, :]
    out = np.eye(4)
    for a, idx_axis in enumerate(LAYOUT[slice_axis]):
        out[:3, a] = ras[:3, idx_axis]
    out[:3, 3] = ras[:3, 3]
    return out


def run_reference(directory: str, modality: str) -> ReferenceResult:
    """One series folder -> foreground tokens, the reference way. ``modality``: CT or MR."""
    t = {}
    t0 = time.perf_counter()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    t1 = time.perf_counter()
    t["read"] = t1 - t0

    img = sitk.DICOMOrient(img, "RPI")
    sizes = np.array(img.GetSize(), int)
    spacing = np.array(img.GetSpacing(), float)
    s = reference_slice_axis(sizes, spacing)
    t2 = time.perf_counter()
    t["orient"] = t2 - t1

    target = [SLICE_MM if a == s else INPLANE_MM for a in range(3)]
    out_size = [int(sizes[a] * spacing[a] / target[a]) for a in range(3)]
    res = sitk.Resample(img, out_size, sitk.Transform(), sitk.sitkBSpline, img.GetOrigin(), target,
                        img.GetDirection(), 0.0, sitk.sitkFloat32)
    del img
    t3 = time.perf_counter()
    t["resample"] = t3 - t2

    m = [PATCH[0] if a == s else PATCH[1] for a in range(3)]
    start = [(out_size[a] % m[a]) // 2 for a in range(3)]
    keep = [(out_size[a] // m[a]) * m[a] for a in range(3)]
    if min(keep) <= 0:
        raise ValueError(f"series too small for one token after resampling: {out_size}")
    crop = sitk.Extract(res, keep, start)
    del res
    affine = sitk_affine_ras(crop, s)
    vol = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(crop), _TO_LAYOUT[s]))
    del crop
    t4 = time.perf_counter()
    t["crop_array"] = t4 - t3

    if modality == "CT":
        views = {name: _window_u8(vol, w, lv) for name, w, lv in CT_WINDOWS}
        fg = vol > CT_BACKGROUND_HU
    elif modality == "MR":
        views = {"mr": _percentile_u8(vol, *MR_CLIP_PCT)}
        fg = vol > np.percentile(vol, MR_BACKGROUND_PCT)
    else:
        raise ValueError(modality)
    grid = tuple(n // p for n, p in zip(vol.shape, PATCH))
    idx = np.flatnonzero(token_foreground(fg, PATCH).reshape(-1))
    tokens = np.ascontiguousarray(np.stack([patchify(v, PATCH)[idx] for v in views.values()], axis=1))
    coords = np.stack(np.unravel_index(idx, grid), axis=1).astype(np.int16)
    t["intensity_tokens"] = time.perf_counter() - t4
    return ReferenceResult(vol, affine, s, views, tokens, coords, t)
