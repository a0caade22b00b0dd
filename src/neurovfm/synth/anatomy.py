"""A new head for every subject, built on the real template anatomy.

A subject is the template's tissue fractions, changed by age (atrophy, ventricle size), by
pathology (lesion tissues, mass-effect deformations) and then placed in the scanner by a
random similarity transform (head size, pose, position off-centre) composed with a smooth
random non-linear warp and a slight left-right asymmetry. Sampling a series means mapping
each scanner voxel to template coordinates and interpolating; lesion masks go through the
same mapping, so they land exactly where the lesions are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from neurovfm.synth.assets import GRID_AFFINE, GRID_SHAPE, Template

NORMAL_TISSUES = ("gm", "wm", "csf", "bone", "soft", "air")
LESION_TISSUES = (
    "blood_acute", "blood_chronic", "edema", "infarct_acute", "infarct_chronic", "gliosis", "tumour",
    "necrosis", "enhancing", "wm_lesion", "calcification", "meningioma", "gas", "fat",
)
ALL_TISSUES = NORMAL_TISSUES + LESION_TISSUES
_ORIGIN = -GRID_AFFINE[:3, 3]  # template voxel index of RAS (0, 0, 0)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rxm = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rym = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rzm = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rzm @ rym @ rxm


@dataclass
class Subject:
    """Tissue fractions in template space plus the subject's placement in the scanner."""

    age: int
    sex: str
    tissues: dict[str, np.ndarray]  # name -> float32 fraction on the template grid
    world_from_template: np.ndarray  # 4x4: template RAS mm -> scanner RAS mm
    warp: np.ndarray  # (3, cx, cy, cz) displacement in template voxels on a coarse grid
    lesion_labels: np.ndarray  # int16 on the template grid: finding index + 1 (0 = none)
    template: Template = field(repr=False)

    def template_index(self, ras: np.ndarray) -> np.ndarray:
        """Scanner RAS points (..., 3) -> template voxel coordinates (..., 3)."""
        inv = np.linalg.inv(self.world_from_template)
        m = ras @ inv[:3, :3].T + inv[:3, 3]
        v = m + _ORIGIN
        scale = (np.array(self.warp.shape[1:]) - 1) / (np.array(GRID_SHAPE) - 1)
        flat = v.reshape(-1, 3)
        cidx = (flat * scale).T
        disp = np.stack([ndimage.map_coordinates(self.warp[a], cidx, order=1, mode="nearest") for a in range(3)], 1)
        return (flat + disp).reshape(v.shape)

    def property_map(self, values: dict[str, float], default: float = 0.0) -> np.ndarray:
        """Sum over tissues of fraction x value (a partial-volume mix) on the template grid."""
        out = np.zeros(GRID_SHAPE, np.float32)
        for name, frac in self.tissues.items():
            v = values.get(name, default)
            if v:
                out += frac * np.float32(v)
        return out


def make_subject(template: Template, rng: np.random.Generator, age: int | None = None, sex: str | None = None,
                 atrophy: float | None = None, ventricle_mm: float | None = None) -> Subject:
    """A random new head from the template (no pathology yet)."""
    age = int(age if age is not None else rng.integers(18, 95))
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    tissues = {k: getattr(template, k).copy() for k in NORMAL_TISSUES}
    # age: cortical thinning and ventricles growing (plus individual spread)
    a = atrophy if atrophy is not None else float(np.clip((age - 45) / 50 + rng.normal(0, 0.12), 0, 1))
    if a > 0:
        _atrophy(tissues, template, a)
    v_mm = ventricle_mm if ventricle_mm is not None else float(np.clip(a * 4 + rng.normal(0, 0.8), 0, 6))
    if v_mm > 0.3:
        enlarge_ventricles(tissues, template, v_mm)
    # head size, pose and position in the scanner
    size = (1.0 if sex == "M" else 0.95) * rng.normal(1.0, 0.035)
    scale = size * np.array([rng.normal(1, 0.02), rng.normal(1, 0.02), rng.normal(1, 0.02)])
    rot = _rotation(np.radians(rng.normal(0, 6)), np.radians(rng.normal(0, 2.5)), np.radians(rng.normal(0, 2.5)))
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(scale)
    aff[:3, 3] = rng.normal(0, [8.0, 10.0, 8.0]) + np.array([0.0, 15.0, 20.0])
    # smooth non-linear warp with a slight left-right asymmetry
    coarse = (10, 12, 10)
    warp = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, coarse), 1.0) for _ in range(3)]).astype(np.float32)
    warp *= np.float32(rng.uniform(1.5, 3.5) / max(np.abs(warp).std(), 1e-6) / 3)
    asym = rng.normal(0, 0.015)
    xs = np.linspace(-1, 1, coarse[0])[:, None, None]
    warp[0] += np.float32(asym * 90 * xs * (xs > 0))
    return Subject(age, sex, tissues, aff, warp, np.zeros(GRID_SHAPE, np.int16), template)


def _atrophy(t: dict[str, np.ndarray], template: Template, a: float) -> None:
    """Widen sulci: grey matter near the brain surface turns to CSF, more with age."""
    depth = template.icv_depth
    loss = np.float32(0.45 * a) * np.exp(-np.maximum(depth - 2.0, 0) / np.float32(4.0 + 4 * a)).astype(np.float32)
    d = t["gm"] * loss
    t["gm"] -= d
    t["csf"] += d


def enlarge_ventricles(t: dict[str, np.ndarray], template: Template, mm: float, edema: float = 0.0) -> np.ndarray:
    """Grow the ventricles by ``mm`` (tissue within that distance becomes CSF); returns the rim
    where ``edema`` (transependymal flow) is added."""
    grow = np.clip((mm - template.vent_dist) / 1.5 + 0.5, 0, 1).astype(np.float32)
    grow *= template.icv_depth > 6
    for k in ("gm", "wm"):
        d = t[k] * grow
        t[k] -= d
        t["csf"] += d
    rim = ((template.vent_dist > mm) & (template.vent_dist < mm + 4)).astype(np.float32)
    if edema > 0:
        add_tissue(t, "edema", rim * np.float32(edema), from_=("wm",))
    return rim


def add_tissue(t: dict[str, np.ndarray], name: str, frac: np.ndarray, from_: tuple[str, ...] | None = None) -> None:
    """Put ``frac`` of tissue ``name`` into each voxel, taking it from the listed tissues
    (proportionally) or from everything present."""
    frac = np.clip(frac.astype(np.float32), 0, 1)
    sources = from_ or tuple(k for k in t if k != name)
    avail = np.zeros_like(frac)
    for k in sources:
        if k in t:
            avail += t[k]
    take = np.minimum(frac, avail)
    ratio = np.divide(take, avail, out=np.zeros_like(take), where=avail > 1e-6)
    for k in sources:
        if k in t:
            t[k] -= t[k] * ratio
    if name not in t:
        t[name] = np.zeros_like(frac)
    t[name] += take


def push_sources(centre_vox: np.ndarray, push_mm: float, radius_mm: float):
    """Where tissue comes from under a radial push away from ``centre_vox`` (template voxels).

    Tissue at x comes from x - u(x), u = push * exp(-(|x - c| / radius)^2) along (x - c),
    inside a bounding box. Returns (box slices, source coordinates [3, ...], box shape).
    """
    reach = int(radius_mm * 2.0) + 2  # exp(-4): the push has faded to 2 % there
    lo = np.maximum(np.round(centre_vox).astype(int) - reach, 0)
    hi = np.minimum(np.round(centre_vox).astype(int) + reach, np.array(GRID_SHAPE))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"))
    rel = grid - np.asarray(centre_vox, np.float32)[:, None, None, None]
    r = np.sqrt((rel ** 2).sum(0)) + 1e-3
    mag = push_mm * np.exp(-(r / radius_mm) ** 2) * np.minimum(r / max(radius_mm * 0.3, 1.0), 1.0)
    return sl, (grid - rel / r * mag).reshape(3, -1), r.shape


def deform(t: dict[str, np.ndarray], centre_vox: np.ndarray, push_mm: float, radius_mm: float,
           only: tuple[str, ...] | None = None) -> None:
    """Mass effect: push tissue radially away from ``centre_vox`` (edits ``t`` in place)."""
    sl, src, shape = push_sources(centre_vox, push_mm, radius_mm)
    for k in (only or tuple(t)):
        if k in t and t[k][sl].any():  # an empty channel stays empty under a push
            t[k][sl] = ndimage.map_coordinates(t[k], src, order=1, mode="nearest").reshape(shape)


def deform_labels(labels: np.ndarray, centre_vox: np.ndarray, push_mm: float, radius_mm: float) -> None:
    """The same push applied to an integer label map (nearest neighbour), in place."""
    sl, src, shape = push_sources(centre_vox, push_mm, radius_mm)
    labels[sl] = ndimage.map_coordinates(labels, src, order=0, mode="nearest").reshape(shape)
