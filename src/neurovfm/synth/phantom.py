"""An asymmetric head phantom in scanner space, written as real DICOM series.

Used by the tests (orientation, bad input, privacy), the benchmark's small runs and the
demo source before the full synthetic archive exists. LPS millimetres: +x is the patient's
LEFT; the marker sits on the left, anterior and superior, so any flip or swap moves it.
"""

from __future__ import annotations

import numpy as np

from neurovfm.synth.dicom_writer import Identity, SeriesSpec, axis_aligned_geometry, write_series

MARKER_LPS = np.array([45.0, -20.0, 15.0])
MARKER_RADIUS = 9.0


def _soft(signed_mm: np.ndarray, width_mm: float = 1.0) -> np.ndarray:
    """Partial-volume edge: 0 outside, 1 inside, a smooth ramp about ``width_mm`` wide."""
    return 1.0 / (1.0 + np.exp(-np.clip(signed_mm / width_mm, -50, 50)))


def head_phantom_hu(pts: np.ndarray) -> np.ndarray:
    """HU of an ellipsoidal head (shell, brain) with a bright marker on the patient's left.

    Edges are soft (as partial volume makes them in a real scan), so interpolation does not
    ring; the shell is kept below the marker's value so no edge can mimic the marker.
    """
    r = np.linalg.norm(pts / np.array([72.0, 92.0, 68.0]), axis=-1)
    inside_head = _soft((1.0 - r) * 70.0)
    inside_brain = _soft((0.93 - r) * 70.0)
    v = -1000.0 + inside_head * 1090.0 + inside_brain * (35.0 - 90.0)
    d = np.linalg.norm(pts - MARKER_LPS, axis=-1)
    return v + _soft(MARKER_RADIUS - d) * (400.0 - 35.0)


def sample_planes(fn, positions, row, col, ps, rows, cols) -> np.ndarray:
    """Evaluate ``fn`` (LPS points -> values) at every pixel centre of every slice."""
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.empty((len(positions), rows, cols), np.float32)
    for k, p in enumerate(positions):
        pts = p[None, None, :] + ii[..., None] * ps[1] * np.asarray(row) + jj[..., None] * ps[0] * np.asarray(col)
        out[k] = fn(pts)
    return out


def write_phantom_series(out_dir: str, plane: str = "axial", *, n: int = 36, rows: int = 200, cols: int = 190,
                         ps=(1.0, 1.0), step: float = 5.0, tilt_deg: float = 0.0, oblique_deg: float = 0.0,
                         reverse: bool = False, shuffle: bool = False, modality: str = "CT",
                         identity: Identity | None = None, spec: SeriesSpec | None = None, seed: int = 0,
                         filenames=None) -> list[str]:
    """Write the phantom as a one-file-per-slice series; returns the file paths."""
    positions, row, col = axis_aligned_geometry(n, rows, cols, ps, step, plane, tilt_deg=tilt_deg,
                                                oblique_deg=oblique_deg, reverse=reverse)
    planes = sample_planes(head_phantom_hu, positions, row, col, ps, rows, cols)
    rng = np.random.default_rng(seed)
    if modality == "MR":
        planes = np.clip((planes + 1000.0) * 0.4, 0, None) + rng.normal(0, 5, planes.shape)
    order = rng.permutation(n) if shuffle else None
    spec = spec or SeriesSpec(modality=modality, series_description=f"{plane} phantom",
                              repetition_time=4000.0 if modality == "MR" else None,
                              echo_time=100.0 if modality == "MR" else None)
    return write_series(out_dir, planes, positions, row, col, ps, identity or Identity(), spec,
                        instance_order=order, filenames=filenames)
