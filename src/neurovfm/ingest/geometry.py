"""From a stack of planes in scanner space to the canonical [D, H, W] grid.

The reference policy (SPEC.md section 2): reorient to RPI by axis permutation and flips only
(the acquisition plane is kept, an oblique series keeps its oblique affine), choose the slice
axis, resample to 1 x 1 mm in-plane and 4 mm along the slice axis, centre-crop to multiples
of the patch and put the slice axis first. The layout of the two in-plane axes follows the
reference implementation so its checkpoints see the same arrays:

    slice axis z (axial)    -> [z, y, x]
    slice axis y (coronal)  -> [y, z, x]
    slice axis x (sagittal) -> [x, y, z]

with x increasing toward the patient's Right, y toward Posterior, z toward Inferior.
World coordinates here are RAS+ millimetres (NIfTI convention); DICOM's LPS is converted
on read. Gantry tilt (a shear between slices) is corrected by shifting every plane in-plane
to its true position before the through-plane pass; uneven slice steps are resampled on the
true slice positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from nibabel.orientations import io_orientation

from neurovfm.errors import IngestError
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.ingest.resample import folded_matrix, resample_plane

# RPI as RAS signs: +x toward Right, -y (toward Posterior), -z (toward Inferior)
_RPI_SIGNS = np.array([1, -1, -1])
PLANE_OF_SLICE_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}
# world axes of [D, H, W] for each slice world axis (reference layout)
LAYOUT = {2: (2, 1, 0), 1: (1, 2, 0), 0: (0, 1, 2)}


@dataclass
class StackGeometry:
    """Where each voxel of a stack of planes [i, j, k] sits in RAS millimetres.

    Plane k's pixel (i, j) is at ``origin + i*s_i*dir_i + j*s_j*dir_j + positions[k]*normal
    + shifts[k, 0]*dir_i + shifts[k, 1]*dir_j``. ``positions[0] == 0`` and ``shifts[0] == 0``;
    ``shifts`` are non-zero only for gantry-tilted series.
    """

    shape: tuple[int, int, int]
    spacing_ij: tuple[float, float]
    dir_i: np.ndarray
    dir_j: np.ndarray
    normal: np.ndarray
    origin: np.ndarray
    positions: np.ndarray
    shifts: np.ndarray = field(default=None)  # type: ignore[assignment]
    acquisition_axis: int = 2  # which of i, j, k the scanner stepped along (k for slice stacks)

    def __post_init__(self) -> None:
        self.dir_i = np.asarray(self.dir_i, float)
        self.dir_j = np.asarray(self.dir_j, float)
        self.normal = np.asarray(self.normal, float)
        self.origin = np.asarray(self.origin, float)
        self.positions = np.asarray(self.positions, float)
        if self.shifts is None:
            self.shifts = np.zeros((self.shape[2], 2))
        self.shifts = np.asarray(self.shifts, float)

    @property
    def slice_step(self) -> float:
        if self.shape[2] < 2:
            return 1.0
        return float((self.positions[-1] - self.positions[0]) / (self.shape[2] - 1))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (float(self.spacing_ij[0]), float(self.spacing_ij[1]), abs(self.slice_step))

    @property
    def is_tilted(self) -> bool:
        return bool(np.abs(self.shifts).max() > 1e-3) if self.shifts.size else False

    def affine(self) -> np.ndarray:
        """Nominal voxel -> RAS affine (orthogonal grid, mean slice step, tilt ignored)."""
        a = np.eye(4)
        a[:3, 0] = self.dir_i * self.spacing_ij[0]
        a[:3, 1] = self.dir_j * self.spacing_ij[1]
        a[:3, 2] = self.normal * self.slice_step
        a[:3, 3] = self.origin
        return a


class PlaneSource(Protocol):
    """A stack of 2-D planes, read one at a time so a whole raw volume is never in memory."""

    geometry: StackGeometry

    def plane(self, k: int) -> np.ndarray:  # float32 [n_i, n_j] in HU (CT) or scanner units (MR)
        ...


class RememberedPlanes:
    """A :class:`PlaneSource` that keeps every plane it has read, for callers that need the native
    pixels again after canonicalisation (``analyze`` maps back onto the original grid): each file
    is decoded once. Trades the streaming memory bound for one native volume per series."""

    def __init__(self, source: PlaneSource):
        self.source = source
        self.geometry = source.geometry
        self._planes: dict[int, np.ndarray] = {}

    def plane(self, k: int) -> np.ndarray:
        if k not in self._planes:
            self._planes[k] = self.source.plane(k)
        return self._planes[k]

    def volume(self) -> np.ndarray:
        """The native volume float32 [n_i, n_j, n_k] (planes not read yet are read now); the kept
        planes are released, so the pixels are held once."""
        g = self.geometry
        vol = np.empty(tuple(g.shape), np.float32)
        for k in range(g.shape[2]):
            vol[:, :, k] = self.plane(k)
            self._planes.pop(k, None)
        return vol


@dataclass
class CanonicalVolume:
    """A series on the canonical grid: float32 [D, H, W] and its voxel -> RAS affine."""

    data: np.ndarray
    affine: np.ndarray
    slice_axis: int  # world axis (0 x, 1 y, 2 z) resampled to the slice spacing
    plane: str  # axial / coronal / sagittal (by slice axis)
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    tilt_corrected: bool = False
    oblique_deg: float = 0.0


def reference_slice_axis(sizes: np.ndarray, spacings: np.ndarray) -> int:
    """The reference's slice-axis rule on RPI-ordered sizes and spacings.

    All spacings equal -> axis 0; otherwise the axis whose size no other axis shares (the
    smallest such size); where every size is shared (e.g. 256^3 with unequal spacing) the
    reference crashes, and we take the axis of largest spacing instead.
    """
    sp = np.asarray(spacings, float)
    if np.allclose(sp, sp[0], rtol=1e-4, atol=1e-6):
        return 0
    sizes = [int(s) for s in sizes]
    unique = [s for s in sizes if sizes.count(s) == 1]
    if unique:
        return sizes.index(min(unique))
    return int(np.argmax(sp))


def _axis_orientation(geom: StackGeometry) -> tuple[np.ndarray, np.ndarray]:
    """For input axes (i, j, k): the world axis each is closest to and whether to flip it."""
    aff = np.eye(4)
    aff[:3, 0] = geom.dir_i
    aff[:3, 1] = geom.dir_j
    aff[:3, 2] = geom.normal
    ornt = io_orientation(aff)
    world = ornt[:, 0].astype(int)
    sign = ornt[:, 1].astype(int)
    flip = sign != _RPI_SIGNS[world]
    return world, flip


def _oblique_degrees(geom: StackGeometry) -> float:
    """Largest angle between an input axis and the world axis it is mapped to."""
    worst = 0.0
    for d in (geom.dir_i, geom.dir_j, geom.normal):
        c = float(np.max(np.abs(d)) / max(np.linalg.norm(d), 1e-12))
        worst = max(worst, float(np.degrees(np.arccos(np.clip(c, -1, 1)))))
    return worst


def _fractional_index(coord: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Map physical coordinates along the slice normal to fractional slice indices.

    Piecewise linear between true slice positions (uneven spacing is honoured), linear
    extrapolation with the end steps beyond the first and last slice.
    """
    n = positions.shape[0]
    idx = np.arange(n, dtype=float)
    out = np.interp(coord, positions, idx)
    if n >= 2:
        lo_step = positions[1] - positions[0]
        hi_step = positions[-1] - positions[-2]
        below = coord < positions[0]
        above = coord > positions[-1]
        out[below] = (coord[below] - positions[0]) / lo_step
        out[above] = (n - 1) + (coord[above] - positions[-1]) / hi_step
    return out


def canonicalize(source: PlaneSource, policy: PreprocessPolicy, name: str | None = None,
                 progress: Callable[[int], None] | None = None) -> CanonicalVolume:
    """Reorient, resample, crop and transpose a plane stack to the canonical grid."""
    geom = source.geometry
    n = np.array(geom.shape, dtype=int)
    if geom.positions.shape[0] >= 2 and np.any(np.diff(geom.positions) <= 0):
        raise IngestError("unsorted_positions", "slice positions are not strictly increasing", name)
    spacing = np.array(geom.spacing, dtype=float)
    world, flip = _axis_orientation(geom)
    axis_of_world = np.empty(3, dtype=int)
    axis_of_world[world] = np.arange(3)
    sizes_rpi = n[axis_of_world]
    spacing_rpi = spacing[axis_of_world]
    if policy.slice_axis_rule == "acquisition":
        slice_world = int(world[geom.acquisition_axis])
    else:
        slice_world = reference_slice_axis(sizes_rpi, spacing_rpi)
    layout = LAYOUT[slice_world]
    patch_of_world = {layout[0]: policy.patch[0], layout[1]: policy.patch[1], layout[2]: policy.patch[2]}

    # per input axis: target spacing, kept output indices, coordinates along the axis
    coords: list[np.ndarray] = []
    targets = np.zeros(3)
    for a in range(3):
        w = world[a]
        t = policy.slice_spacing_mm if w == slice_world else policy.inplane_spacing_mm
        targets[a] = t
        # in-plane, a gantry-tilted stack covers the planes' union: each plane is shifted by
        # shifts[k], so the grid reaches from the lowest to the highest shift (none if untilted)
        below = above = 0.0
        if a < 2 and geom.is_tilted:
            below, above = min(0.0, float(geom.shifts[:, a].min())), max(0.0, float(geom.shifts[:, a].max()))
        n_out = int((n[a] * spacing[a] + above - below) / t)  # the reference's size rule (floor)
        m = patch_of_world[w]
        keep = (n_out // m) * m
        if keep <= 0:
            raise IngestError(
                "too_small",
                f"series too small for one token: {n_out} voxels along an axis after resampling, need {m}",
                name,
            )
        start = (n_out % m) // 2
        u = (start + np.arange(keep)) * t  # mm from the first voxel in RPI order
        if a < 2:
            extent = (n[a] - 1) * spacing[a] + above
            c = extent - u if flip[a] else below + u  # mm from input voxel 0 along dir_a
        else:
            c = geom.positions[-1] - u if flip[a] else geom.positions[0] + u
        coords.append(c)

    order = policy.spline_order
    mat_k = folded_matrix(_fractional_index(coords[2], geom.positions), n[2], order).tocsc()
    base_i = coords[0] / spacing[0]
    base_j = coords[1] / spacing[1]
    tilted = geom.is_tilted
    mat_i = folded_matrix(base_i, n[0], order)
    mat_j = folded_matrix(base_j, n[1], order)

    # one pass over the planes: each is resampled in-plane and added into the output slices
    # its through-plane weights reach (prefilters folded into the matrices, so the raw volume
    # and the full-resolution stack are never held in memory)
    vol = np.zeros((coords[2].size, coords[0].size, coords[1].size), dtype=np.float32)
    # a tilted stack's grid also holds space no plane reaches: track coverage, fill it with the
    # series' darkest value (air), never with 0 (which is soft tissue in HU)
    cover = np.zeros_like(vol) if tilted else None
    fill = np.inf
    for k in range(n[2]):
        lo, hi = mat_k.indptr[k], mat_k.indptr[k + 1]
        if lo == hi:
            continue  # no output slice depends on this plane
        plane = source.plane(int(k))
        if plane.shape != (n[0], n[1]):
            raise IngestError("plane_shape", f"plane {k} has shape {plane.shape}, expected {(n[0], n[1])}", name)
        if tilted:
            si, sj = geom.shifts[k]
            fi, fj = base_i - si / spacing[0], base_j - sj / spacing[1]
            mi = folded_matrix(fi, n[0], order)
            mj = folded_matrix(fj, n[1], order)
        else:
            mi, mj = mat_i, mat_j
        res = resample_plane(np.asarray(plane, np.float32), mi, mj)
        for o, wgt in zip(mat_k.indices[lo:hi], mat_k.data[lo:hi]):
            vol[o] += np.float32(wgt) * res
        if cover is not None:
            fill = min(fill, float(np.min(plane)))
            # the folded (mirrored) boundary would copy the head into space this plane never
            # imaged: coverage is where the plane's own indices fall inside it
            cov = (((fi >= -0.5) & (fi <= n[0] - 0.5))[:, None] & ((fj >= -0.5) & (fj <= n[1] - 0.5))[None, :])
            cov = cov.astype(np.float32)
            for o, wgt in zip(mat_k.indices[lo:hi], mat_k.data[lo:hi]):
                cover[o] += np.float32(wgt) * cov
        if progress is not None:
            progress(1)

    if cover is not None and np.isfinite(fill):
        out = np.clip(cover, 0.0, 1.0)
        vol = vol * out + (1.0 - out) * np.float32(fill)

    # transpose to the reference layout [D, H, W]
    current = [2, 0, 1]  # input axes of vol's array axes: [k, i, j]
    perm = [current.index(int(axis_of_world[w])) for w in layout]
    data = np.ascontiguousarray(np.transpose(vol, perm))

    # affine of the canonical grid
    dirs = [geom.dir_i, geom.dir_j, geom.normal]
    aff = np.eye(4)
    origin = geom.origin + coords[0][0] * geom.dir_i + coords[1][0] * geom.dir_j + coords[2][0] * geom.normal
    for out_axis, w in enumerate(layout):
        a = int(axis_of_world[w])
        sign = -1.0 if flip[a] else 1.0
        aff[:3, out_axis] = dirs[a] * targets[a] * sign
    aff[:3, 3] = origin
    return CanonicalVolume(
        data=data,
        affine=aff,
        slice_axis=slice_world,
        plane=PLANE_OF_SLICE_AXIS[slice_world],
        source_shape=tuple(int(v) for v in n),
        source_spacing=tuple(float(v) for v in spacing),
        tilt_corrected=tilted,
        oblique_deg=_oblique_degrees(geom),
    )
