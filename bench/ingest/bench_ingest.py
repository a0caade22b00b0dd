"""Ingestion benchmark: our pipeline against a SimpleITK reference, side by side, in one run.

    python bench/ingest/bench_ingest.py [--repeats N] [--quick]

Writes synthetic DICOM series into a temporary folder with the project's own writer
(neurovfm.synth.dicom_writer), then for every series runs

  ours       read_header per file -> group_records -> build_stack -> canonicalize -> tokenize
  reference  SimpleITK: ImageSeriesReader -> DICOMOrient RPI -> Resample sitkBSpline -> Extract
             -> windows / percentile scaling -> tokens  (bench/ingest/reference_sitk.py)

interleaved (the order alternates every repeat), and reports the median series/s of each,
their ratio, parity of the canonical grids (shape, affine, uint8 view difference) and the
peak memory growth of one series in a fresh subprocess per pipeline. Results go to
bench/results/ingest.json (ingest_quick.json with --quick). See bench/ingest/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.join(REPO, "src") not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(1, os.path.join(REPO, "src"))

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------------------
# memory probe (runs in a fresh subprocess; must come before the heavy imports)
# ----------------------------------------------------------------------------------------


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memprobe(pipeline: str, directory: str, modality: str) -> dict:
    """Peak RSS growth of one series, measured from after the imports."""
    import gc
    import resource

    if pipeline == "ours":
        import pydicom  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import scipy.sparse  # noqa: F401
        from pydicom.pixels import pixel_array  # noqa: F401  (decoder modules, imported lazily otherwise)

        import neurovfm.ingest.dicom_headers  # noqa: F401
        import neurovfm.ingest.dicom_series  # noqa: F401
        import neurovfm.ingest.geometry  # noqa: F401
        import neurovfm.tokens.patches  # noqa: F401
        run = run_ours
    else:
        import SimpleITK  # noqa: F401

        import reference_sitk
        run = reference_sitk.run_reference
    gc.collect()
    reset = _reset_peak()
    base_kb = _proc_status_kb("VmRSS")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run(directory, modality) if pipeline == "ref" else run(directory)
    wall = time.perf_counter() - t0
    hwm_kb = _proc_status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    if reset and hwm_kb is not None:
        peak_kb, how = hwm_kb, "VmHWM after reset via /proc/self/clear_refs"
    else:  # ru_maxrss is a lifetime peak; fine as long as the imports peaked lower
        peak_kb, how = maxrss_kb, "ru_maxrss (lifetime peak)"
    return dict(pipeline=pipeline, base_rss_bytes=base_kb * 1024, peak_rss_bytes=peak_kb * 1024,
                growth_bytes=(peak_kb - base_kb) * 1024, method=how, seconds=wall,
                maxrss_before_bytes=maxrss_before_kb * 1024)


# ----------------------------------------------------------------------------------------
# our pipeline
# ----------------------------------------------------------------------------------------


class _TimedSource:
    """A PlaneSource proxy that adds up the time spent decoding planes."""

    def __init__(self, stack):
        self._stack = stack
        self.geometry = stack.geometry
        self.seconds = 0.0
        self.planes = 0

    def plane(self, k: int):
        t0 = time.perf_counter()
        p = self._stack.plane(k)
        self.seconds += time.perf_counter() - t0
        self.planes += 1
        return p


def run_ours(directory: str):
    """One series folder -> (CanonicalVolume, TokenizedSeries, stage seconds)."""
    from neurovfm.ingest.dicom_headers import read_header
    from neurovfm.ingest.dicom_series import build_stack, group_records
    from neurovfm.ingest.geometry import canonicalize
    from neurovfm.ingest.policy import DEFAULT_POLICY
    from neurovfm.tokens.patches import tokenize

    t = {}
    t0 = time.perf_counter()
    paths = sorted(e.path for e in os.scandir(directory) if e.is_file())
    records = []
    for p in paths:
        records.extend(read_header(p))
    t1 = time.perf_counter()
    t["headers"] = t1 - t0
    cands = group_records(records)
    if len(cands) != 1:
        raise RuntimeError(f"{directory}: expected one series, got {len(cands)}")
    stack = build_stack(cands[0], DEFAULT_POLICY)
    t2 = time.perf_counter()
    t["group_stack"] = t2 - t1
    src = _TimedSource(stack)
    cv = canonicalize(src, DEFAULT_POLICY, name=directory)
    t3 = time.perf_counter()
    t["decode"] = src.seconds
    t["resample"] = (t3 - t2) - src.seconds
    ts = tokenize(cv, stack.modality, DEFAULT_POLICY)
    t["tokens"] = time.perf_counter() - t3
    return cv, ts, t


# ----------------------------------------------------------------------------------------
# synthetic inputs
# ----------------------------------------------------------------------------------------


def _ellipsoid_depth(x, y, z, centre, axes):
    """Approximate signed depth (mm, > 0 inside) below the surface of an ellipsoid."""
    r = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                + ((z - centre[2]) / axes[2]) ** 2)
    return (1.0 - r) * min(axes)


def _inside(x, y, z, centre, axes, edge_mm=0.8):
    """Soft membership (0..1) of an ellipsoid, with a ramp of ``edge_mm`` (partial volume)."""
    d = _ellipsoid_depth(x, y, z, centre, axes)
    return np.clip(0.5 + d / edge_mm, 0.0, 1.0).astype(np.float32)


# tissue values (CT: HU; MR: T2-like signal)
_TISSUE = {
    "CT": dict(air=-1000.0, scalp=40.0, skull=None, csf=8.0, grey=39.0, white=29.0, deep_grey=36.0,
               ventricle=5.0, lesion=65.0),
    "MR": dict(air=0.0, scalp=700.0, skull=60.0, csf=1800.0, grey=1100.0, white=780.0, deep_grey=950.0,
               ventricle=1850.0, lesion=1450.0),
}
_HEAD_C = np.array([0.0, 6.0, -6.0])  # LPS mm
_HEAD_AX = np.array([74.0, 94.0, 84.0])


def head_phantom(x, y, z, modality: str) -> np.ndarray:
    """Noise-free head at LPS points (mm): scalp, skull, CSF, cortex, white matter, ventricles."""
    tv = _TISSUE[modality]
    c, ax = _HEAD_C, _HEAD_AX
    v = np.full(np.shape(x), tv["air"], np.float32)

    def put(mask, value):
        nonlocal v
        v = v + mask * (value - v)

    put(_inside(x, y, z, c, ax), tv["scalp"])
    skull_val = tv["skull"]
    if skull_val is None:  # CT bone 1000..1500 HU, varying smoothly over the vault
        skull_val = (1250.0 + 250.0 * np.sin(x / 9.0) * np.cos(y / 11.0) * np.cos(z / 13.0)).astype(np.float32)
    put(_inside(x, y, z, c, ax - 5.0), skull_val)
    put(_inside(x, y, z, c, ax - 12.0), tv["csf"])
    put(_inside(x, y, z, c, ax - 14.0), tv["grey"])
    # white matter: a smaller, slightly lobulated core under a ~3 mm cortex
    lob = 2.0 * np.sin(x / 7.0) * np.sin(y / 8.0) * np.cos(z / 6.0)
    put(np.clip(0.5 + (_ellipsoid_depth(x, y, z, c, ax - 17.5) + lob) / 0.8, 0, 1).astype(np.float32),
        tv["white"])
    for sx in (-1.0, 1.0):
        put(_inside(x, y, z, c + [sx * 18.0, -4.0, 2.0], [7.0, 10.0, 8.0]), tv["deep_grey"])
        put(_inside(x, y, z, c + [sx * 9.0, 0.0, 14.0], [5.0, 22.0, 10.0]), tv["ventricle"])
    put(_inside(x, y, z, c + [0.0, 4.0, 2.0], [1.6, 9.0, 7.0]), tv["ventricle"])
    put(_inside(x, y, z, c + [-34.0, 18.0, 24.0], [8.0, 12.0, 10.0]), tv["lesion"])
    return v


def _correlated_noise(rng, shape, sd, sigma_px):
    from scipy import ndimage

    n = rng.standard_normal(shape).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma_px, mode="wrap")
    return n * np.float32(sd / max(float(n.std()), 1e-6))


def make_series(out_dir: str, *, modality: str, n: int, rows: int, cols: int, pixel_mm: float,
                step_mm: float, plane: str, seed: int, noise_sd: float) -> dict:
    """Write one synthetic series and describe it."""
    from pydicom.uid import generate_uid

    from neurovfm.synth.dicom_writer import Identity, SeriesSpec, axis_aligned_geometry, write_series

    rng = np.random.default_rng(seed)
    positions, row_dir, col_dir = axis_aligned_geometry(n, rows, cols, (pixel_mm, pixel_mm), step_mm,
                                                        plane=plane, center=(0.0, 0.0, 0.0))
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    planes = np.empty((n, rows, cols), np.float32)
    for k in range(n):
        p = [positions[k][a] + cc * pixel_mm * row_dir[a] + rr * pixel_mm * col_dir[a] for a in range(3)]
        v = head_phantom(p[0], p[1], p[2], modality)
        if modality == "CT":
            v += _correlated_noise(rng, (rows, cols), noise_sd, 0.8)
        else:  # magnitude (Rician) noise
            re = v + _correlated_noise(rng, (rows, cols), noise_sd, 0.6)
            im = _correlated_noise(rng, (rows, cols), noise_sd, 0.6)
            v = np.sqrt(re * re + im * im)
        planes[k] = v
    ident = Identity(study_uid=generate_uid(entropy_srcs=["bench-ingest-study", str(seed)]))
    if modality == "CT":
        spec = SeriesSpec(modality="CT", series_description="HEAD 1mm", kernel="H30s", kvp=120.0,
                          slice_thickness=step_mm,
                          series_uid=generate_uid(entropy_srcs=["bench-ingest-ct", str(seed)]),
                          frame_of_reference_uid=generate_uid(entropy_srcs=["bench-ingest-for", str(seed)]))
    else:
        spec = SeriesSpec(modality="MR", series_description="T2 TSE SAG", series_number=2,
                          image_type=("ORIGINAL", "PRIMARY", "M", "ND"), repetition_time=4000.0,
                          echo_time=95.0, field_strength=3.0, scanning_sequence="SE",
                          slice_thickness=step_mm, rescale_intercept=0.0,
                          series_uid=generate_uid(entropy_srcs=["bench-ingest-mr", str(seed)]),
                          frame_of_reference_uid=generate_uid(entropy_srcs=["bench-ingest-for", str(seed)]))
    paths = write_series(out_dir, planes, positions, row_dir, col_dir, (pixel_mm, pixel_mm), ident, spec,
                         uid_seed=f"bench-{seed}")
    return dict(modality=modality, dir=out_dir, files=len(paths), shape=[cols, rows, n], plane=plane,
                pixel_mm=pixel_mm, step_mm=step_mm, raw_bytes=int(rows * cols * n * 2),
                file_bytes=int(sum(os.path.getsize(p) for p in paths)))


def make_inputs(root: str, quick: bool, seed: int) -> dict[str, dict]:
    if quick:
        ct = dict(n=60, rows=256, cols=256, pixel_mm=0.9, step_mm=2.5)
    else:
        ct = dict(n=150, rows=512, cols=512, pixel_mm=0.45, step_mm=1.0)
    mr = dict(n=30, rows=256, cols=256, pixel_mm=0.9, step_mm=5.0)
    out = {}
    name = f"CT {ct['cols']}x{ct['rows']}x{ct['n']} axial"
    out[name] = make_series(os.path.join(root, "ct"), modality="CT", plane="axial", seed=seed,
                            noise_sd=5.0, **ct)
    name = f"MR {mr['cols']}x{mr['rows']}x{mr['n']} sagittal"
    out[name] = make_series(os.path.join(root, "mr"), modality="MR", plane="sagittal", seed=seed + 1,
                            noise_sd=15.0, **mr)
    return out
