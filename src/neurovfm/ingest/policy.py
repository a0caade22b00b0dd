"""The preprocessing policy: every number that turns a series into tokens, in one place.

The defaults are the reference pipeline's choices (SPEC.md section 2). The policy's hash is
written into the token cache; every reader checks it, so tokens made under different
choices are never mixed silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units."""

    name: str
    width: float
    level: float

    @property
    def lower(self) -> float:
        return self.level - self.width / 2.0

    @property
    def upper(self) -> float:
        return self.level + self.width / 2.0


CT_WINDOWS: tuple[Window, ...] = (
    Window("brain", 80.0, 40.0),
    Window("blood", 200.0, 80.0),
    Window("bone", 2800.0, 600.0),
)


@dataclass(frozen=True)
class PreprocessPolicy:
    """Geometry, intensity and token choices (reference values by default)."""

    # geometry
    orientation: str = "RPI"  # axis codes as in nibabel: the direction each array axis increases toward
    inplane_spacing_mm: float = 1.0
    slice_spacing_mm: float = 4.0
    slice_axis_rule: str = "reference"  # "reference" (SPEC) or "acquisition" (DICOM stacking axis)
    spline_order: int = 3  # B-spline order of the resampler (3 = the reference's sitkBSpline)
    patch: tuple[int, int, int] = (4, 16, 16)
    # intensity
    ct_windows: tuple[Window, ...] = CT_WINDOWS
    ct_background_hu: float = -500.0  # voxel is background if HU <= this
    mr_clip_percentiles: tuple[float, float] = (0.5, 99.5)
    mr_background_percentile: float = 10.0  # voxel is background if <= this percentile
    # storage: "hu16" keeps one fixed-point HU view per CT series (windows made at read time);
    # "views8" stores the three uint8 windows. See README "Cache format" for the measurement.
    ct_storage: str = "hu16"
    hu16_scale: float = 8.0  # fixed-point steps per HU (1/8 HU, far below one brain-window level)
    # acceptance limits (refusals, not crashes)
    max_inplane_voxels: int = 4096
    max_slices: int = 4096
    max_raw_bytes: int = 4 * 1024**3
    min_slices: int = 2
    spacing_tolerance: float = 0.25  # relative deviation of a slice step before it counts as uneven
    missing_slice_factor: float = 1.6  # a step this many times the median means missing slices
    max_gantry_tilt_deg: float = 45.0  # tilts up to this are corrected by resampling; beyond, refused
    oblique_tolerance_deg: float = 0.5  # slice normal vs stacking direction disagreement tolerated
    max_4d_volumes: int = 8  # a 4D NIfTI of repeated contrast gives at most this many series

    def __post_init__(self) -> None:
        if self.orientation != "RPI":
            raise ValueError("only the reference orientation 'RPI' is supported")
        if self.slice_axis_rule not in ("reference", "acquisition"):
            raise ValueError(f"slice_axis_rule must be 'reference' or 'acquisition', got {self.slice_axis_rule!r}")
        if self.ct_storage not in ("hu16", "views8"):
            raise ValueError(f"ct_storage must be 'hu16' or 'views8', got {self.ct_storage!r}")
        if self.spline_order not in (1, 3):
            raise ValueError("spline_order must be 1 (linear) or 3 (cubic B-spline)")
        if min(self.inplane_spacing_mm, self.slice_spacing_mm) <= 0:
            raise ValueError("target spacings must be positive")
        if any(p <= 0 for p in self.patch):
            raise ValueError("patch sizes must be positive")
        lo, hi = self.mr_clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("mr_clip_percentiles must satisfy 0 <= lo < hi <= 100")

    @property
    def token_dim(self) -> int:
        d, h, w = self.patch
        return d * h * w

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """Hash of every parameter that changes token values or geometry."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessPolicy":
        d = dict(d)
        if "ct_windows" in d:
            d["ct_windows"] = tuple(Window(**w) if isinstance(w, dict) else w for w in d["ct_windows"])
        for k in ("patch", "mr_clip_percentiles"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


DEFAULT_POLICY = PreprocessPolicy()
