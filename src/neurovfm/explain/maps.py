"""Grounding maps: from per-token scores on the canonical token grid back to the original series.

A head's per-class attention (or any per-token score) lives on the token grid of each series
view. To be useful it must open in 3D Slicer or ITK-SNAP over the scan the user has, so every
map is resampled onto the *native* voxel grid of the series it came from, through the inverse of
the ingest geometry (token index -> RAS through the grid affine; native voxel -> RAS through the
series' own geometry, gantry tilt and uneven slice steps included), and saved with the series'
affine. Laterality is judged in patient space: relative to a mid-sagittal plane estimated from
the head itself, never scanner x = 0 (an off-centre or turned head would fool that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from neurovfm.ingest.geometry import StackGeometry


# -- geometry --------------------------------------------------------------------------------------
def token_centres_ras(grid_affine: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """RAS millimetres [n, 3] of token centres from their (d, h, w) grid indices."""
    c = np.asarray(coords, np.float64)
    return c @ np.asarray(grid_affine)[:3, :3].T + np.asarray(grid_affine)[:3, 3]


def native_plane_ras(geom: StackGeometry, k: int) -> np.ndarray:
    """RAS millimetres [n_i, n_j, 3] of every pixel of plane ``k`` (true position: slice
    positions and gantry-tilt shifts included, as documented on :class:`StackGeometry`)."""
    ni, nj = geom.shape[0], geom.shape[1]
    si, sj = geom.spacing_ij
    off_i = np.arange(ni) * si + geom.shifts[k, 0]
    off_j = np.arange(nj) * sj + geom.shifts[k, 1]
    base = geom.origin + geom.positions[k] * geom.normal
    return base + off_i[:, None, None] * geom.dir_i + off_j[None, :, None] * geom.dir_j


def native_affine(geom: StackGeometry) -> np.ndarray:
    """Voxel -> RAS affine of the original series *with* gantry tilt: the slice column carries the
    per-slice in-plane shift (a shear, which NIfTI's sform can hold), so a saved map sits where the
    scanner put each slice, not where an untilted stack would (exact for even steps and tilt)."""
    a = geom.affine()
    n = geom.shape[2]
    if n >= 2 and geom.is_tilted:
        d = (geom.shifts[-1] - geom.shifts[0]) / (n - 1)
        a[:3, 2] = a[:3, 2] + d[0] * geom.dir_i + d[1] * geom.dir_j
    return a


def dense_grid(coords: np.ndarray, values: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Scatter per-token values onto the full token grid (zero at background tokens)."""
    g = np.zeros(grid_shape, np.float32)
    c = np.asarray(coords, np.int64)
    np.add.at(g, (c[:, 0], c[:, 1], c[:, 2]), np.asarray(values, np.float32))
    return g


def native_grid_index(grid_affine: np.ndarray, geom: StackGeometry) -> np.ndarray:
    """Fractional token-grid index [3, n_i, n_j, n_k] (float32) of every native voxel: the inverse
    of the ingest geometry, computed once per series and reused for every label's map."""
    inv = np.linalg.inv(np.asarray(grid_affine, np.float64))
    r, t = inv[:3, :3], inv[:3, 3]
    si, sj = geom.spacing_ij
    u = r @ (geom.dir_i * si)  # index step per native i
    v = r @ (geom.dir_j * sj)  # index step per native j
    ni, nj, nk = geom.shape
    i = np.arange(ni, dtype=np.float32)[:, None]
    j = np.arange(nj, dtype=np.float32)[None, :]
    out = np.empty((3, ni, nj, nk), np.float32)
    for k in range(nk):
        base = r @ (geom.origin + geom.positions[k] * geom.normal
                    + geom.shifts[k, 0] * geom.dir_i + geom.shifts[k, 1] * geom.dir_j) + t
        for c in range(3):
            out[c, :, :, k] = base[c] + i * np.float32(u[c]) + j * np.float32(v[c])
    return out


def project_to_native(grid_map: np.ndarray, grid_affine_or_index: np.ndarray, geom: StackGeometry | None = None
                      ) -> np.ndarray:
    """Resample a token-grid map [nd, nh, nw] onto the native grid [n_i, n_j, n_k] (trilinear
    between token centres, zero outside the grid). Pass the grid affine and the geometry, or a
    precomputed :func:`native_grid_index`."""
    idx = grid_affine_or_index if geom is None else native_grid_index(grid_affine_or_index, geom)
    return ndimage.map_coordinates(np.asarray(grid_map, np.float32), idx, order=1, mode="constant", cval=0.0,
                                   prefilter=False, output=np.float32)


# -- mid-sagittal plane and side --------------------------------------------------------------------
@dataclass(frozen=True)
class MidPlane:
    """The head's mid-sagittal plane as x = a + b*y + c*z in RAS millimetres (+x = patient's
    right). ``rows`` is how many head rows the fit used (0: fell back to the centroid);
    ``width_mm`` the 95th percentile of the rows' left-right extents (a head is ~130-190 mm)."""

    a: float
    b: float = 0.0
    c: float = 0.0
    rows: int = 0
    width_mm: float = 0.0

    def distance(self, ras: np.ndarray) -> np.ndarray:
        """Signed distance along x: positive on the patient's right, negative on the left."""
        ras = np.asarray(ras, np.float64)
        return ras[..., 0] - (self.a + self.b * ras[..., 1] + self.c * ras[..., 2])


def head_points_ras(volume: np.ndarray, geom: StackGeometry, threshold: float, max_points: int = 200_000,
                    stride: int = 2) -> np.ndarray:
    """RAS points of the head: voxels above ``threshold``, largest connected component (drops
    the scanner table, a headrest or noise), subsampled to at most ``max_points``."""
    fg = np.asarray(volume)[::stride, ::stride] > threshold  # in-plane stride: rows stay dense enough
    fg = ndimage.binary_opening(fg, iterations=1)
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros((0, 3))
    sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    keep = lab == (int(np.argmax(sizes)) + 1)
    ijk = np.argwhere(keep)
    ijk[:, :2] *= stride
    if len(ijk) > max_points:
        ijk = ijk[np.random.default_rng(0).choice(len(ijk), max_points, replace=False)]
    out = np.empty((len(ijk), 3))
    for k in np.unique(ijk[:, 2]):
        sel = ijk[:, 2] == k
        ras = native_plane_ras(geom, int(k))
        out[sel] = ras[ijk[sel, 0], ijk[sel, 1]]
    return out


def otsu_threshold(volume: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (the cut maximising between-class variance): separates an MR head from
    its noisy background far better than a fixed percentile, whose share depends on the FOV."""
    v = np.asarray(volume, np.float64).ravel()[:: max(1, np.asarray(volume).size // 2_000_000)]
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


MAX_SLOPE = 0.6  # a head lying in a scanner is never turned more than ~30 degrees from its sagittal plane


def _chord_midpoints(q: np.ndarray, bin_mm: float) -> np.ndarray:
    """Rows of points binned on (q1, q2): per row the midpoint of its extent along q0, the row's
    mean (q1, q2) and the extent itself -> [n_rows, 4] (rows with < 4 points or a short extent
    are dropped)."""
    key2 = np.floor(q[:, 1:] / bin_mm).astype(np.int64)
    key2 -= key2.min(0)
    key = key2[:, 0] * (int(key2[:, 1].max()) + 1) + key2[:, 1]
    order = np.argsort(key, kind="stable")
    qs = q[order]
    _, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
    lo = np.minimum.reduceat(qs[:, 0], starts)
    hi = np.maximum.reduceat(qs[:, 0], starts)
    m1 = np.add.reduceat(qs[:, 1], starts) / counts
    m2 = np.add.reduceat(qs[:, 2], starts) / counts
    keep = (counts >= 4) & (hi - lo >= 3 * bin_mm)
    return np.column_stack([0.5 * (lo + hi), m1, m2, hi - lo])[keep]


def estimate_midplane(points: np.ndarray, bin_mm: float = 4.0, min_rows: int = 20, iterations: int = 15) -> MidPlane:
    """The head's plane of left-right symmetry. Chords perpendicular to a symmetry plane have their
    midpoints on it, so: take chords along the current normal (scanner x at first), fit a plane to
    their midpoints (least squares, then again without rows far from the fit), turn the chords to
    the new normal and repeat; a turned head converges in a few rounds."""
    pts = np.asarray(points, np.float64)
    if len(pts) == 0:
        return MidPlane(0.0)
    n = np.array([1.0, 0.0, 0.0])
    p0 = np.array([float(pts[:, 0].mean()), 0.0, 0.0])
    width, used = float(np.ptp(pts[:, 0])), 0
    first: MidPlane | None = None
    for _ in range(iterations):
        e2 = np.array([0.0, 1.0, 0.0]) - n[1] * n
        e2 /= np.linalg.norm(e2)
        e3 = np.cross(n, e2)
        basis = np.stack([n, e2, e3])  # rows: chord direction, then the two in-plane axes
        r = _chord_midpoints(pts @ basis.T, bin_mm)
        if len(r) < min_rows:
            break
        A = np.column_stack([np.ones(len(r)), r[:, 1], r[:, 2]])
        coef, *_ = np.linalg.lstsq(A, r[:, 0], rcond=None)
        res = np.abs(A @ coef - r[:, 0])
        good = res <= max(3.0 * np.median(res), 2.0)
        if good.sum() >= min_rows:
            coef, *_ = np.linalg.lstsq(A[good], r[good, 0], rcond=None)
        b, c = (float(np.clip(v, -MAX_SLOPE, MAX_SLOPE)) for v in coef[1:])
        if first is None:  # the scanner-x chord fit: the fallback if the rotation drifts
            first = MidPlane(float(coef[0]), b, c, int(good.sum()), float(np.percentile(r[:, 3], 95)))
        new_n = n - b * e2 - c * e3
        new_n /= np.linalg.norm(new_n)
        p0 = coef[0] * n  # a point of the fitted plane (q1 = q2 = 0)
        new_n = new_n if new_n[0] > 0 else -new_n
        width, used = float(np.percentile(r[:, 3], 95)), int(good.sum())
        moved = float(np.linalg.norm(new_n - n))
        n = new_n
        if moved < 1e-3:
            break
    if used == 0:
        return MidPlane(float(pts[:, 0].mean()), width_mm=width)
    if abs(n[1] / n[0]) > MAX_SLOPE or abs(n[2] / n[0]) > MAX_SLOPE:
        return first or MidPlane(float(pts[:, 0].mean()), width_mm=width)  # drifted (e.g. a thin slab)
    # plane n . (x - p0) = 0 written as x = a + b y + c z
    return MidPlane(float(n @ p0 / n[0]), float(-n[1] / n[0]), float(-n[2] / n[0]), used, width)


@dataclass(frozen=True)
class SideRule:
    """Cut-offs for calling the side of a map's mass (stated in the README)."""

    midline_band_mm: float = 5.0  # within this distance of the mid-sagittal plane counts as midline
    midline_share: float = 0.5  # midline if at least this share of the mass lies in the band
    lateral_share: float = 0.7  # left/right if at least this share of the off-midline mass is there


def side_of_mass(weights: np.ndarray, ras: np.ndarray, plane: MidPlane, rule: SideRule = SideRule()
                 ) -> tuple[str, dict[str, float]]:
    """'left' / 'right' / 'bilateral' / 'midline' for a non-negative mass at RAS points."""
    return side_from_distances(weights, plane.distance(ras), rule)


def side_from_distances(weights: np.ndarray, d: np.ndarray, rule: SideRule = SideRule()
                        ) -> tuple[str, dict[str, float]]:
    """Side of a mass given each point's signed distance to the mid-sagittal plane (+ = right)."""
    w = np.clip(np.asarray(weights, np.float64), 0, None)
    d = np.asarray(d, np.float64)
    tot = float(w.sum())
    if tot <= 0:
        return "unknown", {"left": 0.0, "right": 0.0, "midline": 0.0}
    band = np.abs(d) <= rule.midline_band_mm
    left = float(w[(d < 0) & ~band].sum()) / tot
    right = float(w[(d > 0) & ~band].sum()) / tot
    mid = float(w[band].sum()) / tot
    shares = {"left": round(left, 4), "right": round(right, 4), "midline": round(mid, 4)}
    if mid >= rule.midline_share:
        return "midline", shares
    off = left + right
    if left >= rule.lateral_share * off:
        return "left", shares
    if right >= rule.lateral_share * off:
        return "right", shares
    return "bilateral", shares


# -- files -------------------------------------------------------------------------------------------
def save_nifti(path: str, data: np.ndarray, affine: np.ndarray, kind: str = "image") -> str:
    """Write a NIfTI atomically, no header text (nothing identifying goes in). ``kind="map"``:
    values in [0, 1] stored as uint8 with scale 1/255 (a quarter of the bytes; viewers show 0..1);
    ``"image"``: int16 when the values are whole numbers in range (CT HU, most MR), else float32."""
    import nibabel as nib

    data = np.asarray(data)
    if kind == "map":
        arr = np.round(np.clip(data, 0, 1) * 255).astype(np.uint8)
        img = nib.Nifti1Image(arr, np.asarray(affine, np.float64))
        img.header.set_slope_inter(1.0 / 255.0, 0.0)
    else:
        whole = np.all(np.abs(data) < 32767) and np.array_equal(data, np.round(data))
        img = nib.Nifti1Image(data.astype(np.int16 if whole else np.float32), np.asarray(affine, np.float64))
    img.header["descrip"] = b"neurovfm"
    tmp = path + ".part.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, path)
    return path


def _screen_marks(geom: StackGeometry) -> tuple[str, str, str]:
    """Patient-side letters for the left and right screen edges of ``imshow(plane.T)`` (plane
    axis i runs left -> right on screen), or a note when left/right is through the plane."""
    x = float(geom.dir_i[0])
    if abs(x) >= 0.5:
        return ("L", "R", "") if x > 0 else ("R", "L", "")
    return ("", "", "left/right is across slices (sagittal)")


def montage_png(path: str, image: np.ndarray, heat: np.ndarray, geom: StackGeometry, title: str,
                window: tuple[float, float], plane_mid: MidPlane | None = None, n_slices: int = 6) -> str:
    """The map over the image on the slices that hold most of its mass, patient L/R marked."""
    from matplotlib.figure import Figure  # not pyplot: its global figure registry is not thread-safe

    mass = heat.reshape(-1, heat.shape[2]).sum(0)
    ks = np.sort(np.argsort(-mass)[:n_slices]) if mass.sum() > 0 else np.linspace(0, heat.shape[2] - 1, n_slices).astype(int)
    lo, hi = window
    vmax = float(heat.max()) or 1.0
    left_mark, right_mark, note = _screen_marks(geom)
    fig = Figure(figsize=(2.2 * len(ks), 2.6))
    axes = fig.subplots(1, len(ks), squeeze=False)
    for ax, k in zip(axes[0], ks):
        ax.imshow(np.clip((image[:, :, k].T - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray", origin="upper")
        h = np.ma.masked_less(heat[:, :, k].T / vmax, 0.05)
        ax.imshow(h, cmap="hot", alpha=0.55, vmin=0, vmax=1, origin="upper")
        ax.set_xticks([])
        ax.set_yticks([])
        label = f"slice {int(k) + 1}"
        if note and plane_mid is not None:
            c = native_plane_ras(geom, int(k))[geom.shape[0] // 2, geom.shape[1] // 2]
            d = float(plane_mid.distance(c))
            label += f"  {abs(d):.0f} mm {'R' if d > 0 else 'L'}"
        ax.set_title(label, fontsize=7)
        if left_mark:
            ax.text(0.02, 0.5, left_mark, color="yellow", fontsize=9, weight="bold", transform=ax.transAxes, va="center")
            ax.text(0.98, 0.5, right_mark, color="yellow", fontsize=9, weight="bold", transform=ax.transAxes,
                    va="center", ha="right")
    fig.suptitle(title + (f"  ({note})" if note else ""), fontsize=8)
    fig.tight_layout()
    tmp = path + ".part.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    return path
