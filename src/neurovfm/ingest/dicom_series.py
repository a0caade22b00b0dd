"""Header records -> series -> a validated stack of planes that reads pixels lazily.

Grouping: by study and series UID, then split where images cannot share one volume
(orientation, matrix, pixel spacing, echo, b-value, image type, temporal position, stack).
Within a volume, slices are sorted by position along the slice normal; duplicates, missing
slices and irregular positions are refused with a reason; a constant in-plane drift between
slices (gantry tilt) is measured and later corrected by resampling.
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom

from neurovfm.errors import IngestError
from neurovfm.ingest.dicom_headers import SliceRecord
from neurovfm.ingest.geometry import StackGeometry
from neurovfm.ingest.policy import PreprocessPolicy

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass
class SeriesCandidate:
    """Images that should form one volume (one series, or one split of a series)."""

    records: list[SliceRecord]
    split_index: int = 0
    n_splits: int = 1

    @property
    def first(self) -> SliceRecord:
        return self.records[0]

    @property
    def identity(self) -> str:
        """Raw identity (UIDs) used only as HMAC input, never stored."""
        r = self.first
        return f"{r.study_uid}\0{r.series_uid}\0{self.split_index}/{self.n_splits}"

    @property
    def display_path(self) -> str:
        return os.path.dirname(self.first.path) or self.first.path

    def source_fingerprint(self) -> str:
        """Raw fingerprint of the source files (hashed before storage)."""
        parts = sorted(f"{r.sop_uid}:{r.frame}:{r.file_size}" for r in self.records)
        return "\n".join(parts)


def group_records(records: list[SliceRecord]) -> list[SeriesCandidate]:
    """Group by (study, series) and split into volumes that share geometry and contrast."""
    by_series: dict[tuple[str, str], list[SliceRecord]] = defaultdict(list)
    for r in records:
        by_series[(r.study_uid, r.series_uid)].append(r)
    out: list[SeriesCandidate] = []
    for key in sorted(by_series):
        recs = by_series[key]
        # identical instances (same SOP and frame, e.g. a file copied twice) count once
        seen: dict[tuple[str, int | None], SliceRecord] = {}
        for r in sorted(recs, key=lambda r: (r.path, r.frame or 0)):
            seen.setdefault((r.sop_uid, r.frame), r)
        recs = list(seen.values())
        parts: dict[tuple, list[SliceRecord]] = OrderedDict()
        for r in sorted(recs, key=lambda r: r.split_key().__repr__()):
            parts.setdefault(r.split_key(), []).append(r)
        groups = []
        for part in parts.values():
            groups.extend(_split_by_acquisition(part))
        for i, g in enumerate(groups):
            out.append(SeriesCandidate(g, split_index=i, n_splits=len(groups)))
    return out


def _position(r: SliceRecord) -> float | None:
    if r.iop is None or r.ipp is None:
        return None
    n = np.cross(r.iop[:3], r.iop[3:])
    return float(np.dot(n, r.ipp))


def _split_by_acquisition(recs: list[SliceRecord]) -> list[list[SliceRecord]]:
    """Split by acquisition number only where that resolves repeated slice positions."""
    pos = [_position(r) for r in recs]
    if any(p is None for p in pos):
        return [recs]
    rounded = [round(p, 2) for p in pos]
    if len(set(rounded)) == len(rounded):
        return [recs]
    acq = {r.acquisition_number for r in recs}
    if len(acq) <= 1:
        return [recs]
    groups: dict[int | None, list[SliceRecord]] = defaultdict(list)
    for r in recs:
        groups[r.acquisition_number].append(r)
    return [groups[k] for k in sorted(groups, key=lambda v: (v is None, v))]


class DicomStack:
    """A :class:`PlaneSource` over sorted DICOM slices (files or frames)."""

    def __init__(self, records: list[SliceRecord], geometry: StackGeometry, modality: str):
        self.records = records
        self.geometry = geometry
        self.modality = modality
        self._frames_path: str | None = None
        self._frames: np.ndarray | None = None

    def _decode(self, path: str) -> np.ndarray:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise IngestError("unreadable", f"file cannot be read ({type(exc).__name__})", path) from None
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise IngestError("no_pixel_data", "no pixel data in the file (missing, or the file is truncated)", path)
        try:
            arr = ds.pixel_array
        except NotImplementedError as exc:
            raise IngestError("unsupported_syntax", f"no decoder for this transfer syntax ({str(exc)[:80]})", path) from None
        except Exception as exc:
            raise IngestError("bad_pixel_data", f"pixel data cannot be decoded ({type(exc).__name__}: {str(exc)[:80]})", path) from None
        return arr

    def plane(self, k: int) -> np.ndarray:
        r = self.records[k]
        if r.frame is None:
            arr = self._decode(r.path)
        else:
            if self._frames_path != r.path:
                self._frames = self._decode(r.path)
                self._frames_path = r.path
            frames = self._frames
            assert frames is not None
            n_decoded = frames.shape[0] if frames.ndim == 3 else 1
            if r.frame >= n_decoded:
                raise IngestError(
                    "bad_pixel_data",
                    f"frame {r.frame} requested but the pixel data holds {n_decoded} frame(s) "
                    f"(header says {r.number_of_frames})",
                    r.path,
                )
            arr = frames[r.frame] if frames.ndim == 3 else frames
        if arr.ndim != 2 or arr.shape != (r.rows, r.cols):
            raise IngestError("bad_pixel_data", f"pixel array has shape {arr.shape}, header says {(r.rows, r.cols)}", r.path)
        out = arr.astype(np.float32) * np.float32(r.slope) + np.float32(r.intercept)
        if r.photometric == "MONOCHROME1" and self.modality == "MR":
            out = out.max() - out
        if not np.isfinite(out).all():
            raise IngestError("non_finite", "pixel values are not finite", r.path)
        return out.T  # [i (columns), j (rows)]


def build_stack(cand: SeriesCandidate, policy: PreprocessPolicy) -> DicomStack:
    """Validate a candidate's geometry and return a lazy plane stack, or refuse with a reason."""
    recs = cand.records
    first = recs[0]
    name = first.path
    if first.samples_per_pixel != 1 or first.photometric.startswith(("RGB", "YBR", "PALETTE")):
        raise IngestError("colour", f"colour image ({first.photometric}, {first.samples_per_pixel} samples per pixel)", name)
    if first.rows <= 0 or first.cols <= 0:
        raise IngestError("bad_dimensions", f"zero image dimension ({first.rows} x {first.cols})", name)
    if max(first.rows, first.cols) > policy.max_inplane_voxels:
        raise IngestError("too_large", f"image matrix {first.rows} x {first.cols} exceeds the cap of {policy.max_inplane_voxels}", name)
    if len(recs) > policy.max_slices:
        raise IngestError("too_large", f"{len(recs)} slices exceed the cap of {policy.max_slices}", name)
    raw_bytes = first.rows * first.cols * len(recs) * max(first.bits_allocated // 8, 1)
    if raw_bytes > policy.max_raw_bytes:
        raise IngestError("too_large", f"raw volume of {raw_bytes / 2**30:.1f} GiB exceeds the cap", name)
    if len(recs) < policy.min_slices:
        raise IngestError("single_slice", f"only {len(recs)} slice(s); a volume needs at least {policy.min_slices}", name)
    if any(r.iop is None or r.ipp is None or r.pixel_spacing is None for r in recs):
        raise IngestError("missing_geometry", "ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing", name)
    ps = np.array(first.pixel_spacing, float)
    if not np.all(np.isfinite(ps)) or np.any(ps <= 0) or np.any(ps > 50):
        raise IngestError("bad_geometry", f"implausible pixel spacing {tuple(ps)}", name)

    row = np.array(first.iop[:3], float)
    col = np.array(first.iop[3:], float)
    if not (np.isfinite(row).all() and np.isfinite(col).all()) or np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise IngestError("bad_geometry", "degenerate ImageOrientationPatient", name)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    if abs(float(np.dot(row, col))) > 1e-2:
        raise IngestError("bad_geometry", "row and column directions are not orthogonal", name)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    ipp = np.array([r.ipp for r in recs], float)
    d = ipp @ normal
    order = np.argsort(d, kind="stable")
    recs = [recs[i] for i in order]
    ipp = ipp[order]
    d = d[order]
    steps = np.diff(d)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise IngestError("duplicate_slices", f"two different images at the same slice position ({d[k]:.2f} mm)", name)
    med = float(np.median(steps))
    if steps.max() > policy.missing_slice_factor * med:
        k = int(np.argmax(steps))
        raise IngestError(
            "missing_slices",
            f"gap of {steps[k]:.2f} mm between slices {k} and {k + 1} where slices are {med:.2f} mm apart (missing slices)",
            name,
        )
    rel = ipp - ipp[0]
    along = rel @ normal
    perp = rel - np.outer(along, normal)
    shifts = np.stack([perp @ row, perp @ col], axis=1)  # mm along row / column directions
    if np.abs(shifts).max() > 1e-3:
        # gantry tilt: the drift must be linear in the slice position
        coef, *_ = np.linalg.lstsq(along[:, None], shifts, rcond=None)
        resid = np.abs(shifts - along[:, None] * coef).max()
        if resid > 0.5 * ps.min():
            raise IngestError("irregular_positions", f"slice positions drift irregularly ({resid:.2f} mm off a straight line)", name)
        tilt = float(np.degrees(np.arctan(np.linalg.norm(coef))))
        if tilt > policy.max_gantry_tilt_deg:
            raise IngestError("gantry_tilt", f"gantry tilt of {tilt:.1f} degrees exceeds {policy.max_gantry_tilt_deg}", name)
    geom = StackGeometry(
        shape=(first.cols, first.rows, len(recs)),
        spacing_ij=(float(ps[1]), float(ps[0])),
        dir_i=row * _LPS_TO_RAS,
        dir_j=col * _LPS_TO_RAS,
        normal=normal * _LPS_TO_RAS,
        origin=ipp[0] * _LPS_TO_RAS,
        positions=along,
        shifts=shifts,
        acquisition_axis=2,
    )
    return DicomStack(recs, geom, first.modality)


def gantry_tilt_degrees(geom: StackGeometry) -> float:
    """Tilt angle implied by the in-plane drift per mm of slice position."""
    if geom.shape[2] < 2 or not geom.is_tilted:
        return 0.0
    drift = (geom.shifts[-1] - geom.shifts[0]) / max(geom.positions[-1] - geom.positions[0], 1e-9)
    return float(np.degrees(np.arctan(np.linalg.norm(drift))))
