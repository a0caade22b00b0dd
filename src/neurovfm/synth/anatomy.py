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
    "necrosis", "enhancing", "wm_lesion", "calcification", "meningioma", "gas", "fat", "iron",
)
ALL_TISSUES = NORMAL_TISSUES + LESION_TISSUES
_ORIGIN = -GRID_AFFINE[:3, 3]  # template voxel index of RAS (0, 0, 0)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rxm = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rym = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rzm = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rzm @ rym @ rxm


# -- CSF spaces: normal variation with age, and the criteria that define the labels ------------------
# Sulcal widening ``s`` (0..1, cortical grey matter near the surface turned to CSF) and ventricular
# enlargement ``v`` (mm of tissue around the ventricles turned to CSF) grow continuously with age in
# normal heads, with individual spread; the width of the extra-axial CSF space over the convexity
# varies too (an unlabelled normal variant). The labels are anatomical criteria, not CSF volume:
#   cerebral_atrophy  <=> sulcal widening beyond what is expected for the age:
#                         s >= expected_sulcal(age) + ATROPHY_MARGIN ("volume loss advanced for age")
#   ventriculomegaly  <=> ventricles enlarged out of proportion to the sulci (an Evans-index-like
#                         excess): v - VENT_PER_SULCAL * s >= VM_EXCESS_MM
# Normal heads stay clear of both thresholds by a margin. Total CSF therefore overlaps between
# labelled and unlabelled heads (an old normal head has more CSF than a young one with atrophy or
# mild ventriculomegaly) while shape and age separate them.
ATROPHY_MARGIN = 0.22
NORMAL_SULCAL_MARGIN = 0.12  # normal heads: s <= expected_sulcal(age) + this
VENT_PER_SULCAL = 6.0  # ex-vacuo ventricular growth expected for sulcal widening s (mm per unit s)
VM_EXCESS_MM = 3.0
NORMAL_EXCESS_MAX = 2.2


def expected_sulcal(age: float) -> float:
    """Age-expected sulcal widening of a normal head (0 at 30, 0.75 at 90)."""
    return float(np.clip((age - 30) / 80, 0, 1))


def normal_csf(age: int, rng: np.random.Generator) -> tuple[float, float]:
    """Age-related, unlabelled sulcal widening and ventricle size of a normal head (s, v mm)."""
    e = expected_sulcal(age)
    s = float(np.clip(e + rng.normal(0, 0.08), 0, e + NORMAL_SULCAL_MARGIN))
    v = float(np.clip(VENT_PER_SULCAL * s + rng.normal(0.5, 1.0), 0, VENT_PER_SULCAL * s + NORMAL_EXCESS_MAX))
    return s, v


def csf_labels(sulcal: float, ventricle_mm: float, age: float) -> dict[str, bool]:
    """The criteria above: which CSF-space labels a head of this age with (s, v) carries."""
    return {"cerebral_atrophy": sulcal >= expected_sulcal(age) + ATROPHY_MARGIN - 1e-9,
            "ventriculomegaly": ventricle_mm - VENT_PER_SULCAL * sulcal >= VM_EXCESS_MM - 1e-9}


def disease_csf(age: int, rng: np.random.Generator, atrophy: bool, ventriculomegaly: bool,
                obstructive: bool = False) -> tuple[float, float]:
    """(s, v) for a head planned with atrophy and/or ventriculomegaly (hydrocephalus when
    ``obstructive``); (s, v) of a normal head of that age otherwise. Always meets csf_labels."""
    s, v = normal_csf(age, rng)
    if atrophy:
        s = expected_sulcal(age) + ATROPHY_MARGIN + float(rng.uniform(0.0, 0.3))
        v = float(np.clip(VENT_PER_SULCAL * s + rng.normal(0.0, 0.9), 0, VENT_PER_SULCAL * s + NORMAL_EXCESS_MAX))
    if ventriculomegaly or obstructive:
        lo, hi = ((VM_EXCESS_MM + 1.5, VM_EXCESS_MM + 4.5) if obstructive else (VM_EXCESS_MM, VM_EXCESS_MM + 2.0))
        v = VENT_PER_SULCAL * s + float(rng.uniform(lo, hi))
    return s, v


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
    sulcal: float = 0.0  # sulcal widening s (see csf_labels)
    ventricle_mm: float = 0.0  # ventricular enlargement v in mm
    seed: int = 0  # for what belongs to the head but is drawn later (e.g. susceptibility artefacts)

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

    def lattice_index(self, origin_ras: np.ndarray, drow_ras: np.ndarray, dcol_ras: np.ndarray, n_rows: int,
                      n_cols: int, sub: int = 4) -> np.ndarray:
        """Template voxel coordinates [n_rows, n_cols, 3] of the planar lattice
        ``origin + r * drow + c * dcol`` (scanner RAS mm). The affine part is exact; the smooth warp
        (cells of ~18 mm) is evaluated every ``sub`` lattice points and interpolated bilinearly
        (separable matrices), which is what makes rendering cheap."""
        inv = np.linalg.inv(self.world_from_template)
        lin = inv[:3, :3]
        v0 = lin @ np.asarray(origin_ras, float) + inv[:3, 3] + _ORIGIN
        vr, vc = lin @ np.asarray(drow_ras, float), lin @ np.asarray(dcol_ras, float)
        r = np.arange(n_rows, dtype=float)[:, None, None]
        c = np.arange(n_cols, dtype=float)[None, :, None]
        v = v0 + r * vr + c * vc
        kr = np.arange(0, n_rows - 1 + sub, sub, dtype=float)
        kc = np.arange(0, n_cols - 1 + sub, sub, dtype=float)
        vs = v0 + kr[:, None, None] * vr + kc[None, :, None] * vc
        scale = (np.array(self.warp.shape[1:]) - 1) / (np.array(GRID_SHAPE) - 1)
        cidx = (vs.reshape(-1, 3) * scale).T
        for a in range(3):
            d = ndimage.map_coordinates(self.warp[a], cidx, order=1, mode="nearest").reshape(len(kr), len(kc))
            v[..., a] += upsample_linear(upsample_linear(d, n_rows, sub, 0), n_cols, sub, 1)
        return v

    def property_map(self, values: dict[str, float], default: float = 0.0) -> np.ndarray:
        """Sum over tissues of fraction x value (a partial-volume mix) on the template grid."""
        out = np.zeros(GRID_SHAPE, np.float32)
        for name, frac in self.tissues.items():
            v = values.get(name, default)
            if v:
                out += frac * np.float32(v)
        return out


def upsample_linear(a: np.ndarray, n: int, sub: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` of samples taken every ``sub`` points to ``n`` points
    (two gathers and a blend per output: no dense interpolation matrix)."""
    m = a.shape[axis]
    x = np.arange(n) / sub
    lo = np.minimum(np.floor(x).astype(int), max(m - 2, 0))
    hi = np.minimum(lo + 1, m - 1)
    shape = [1] * a.ndim
    shape[axis] = n
    f = (x - lo).astype(a.dtype).reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - f) + np.take(a, hi, axis=axis) * f


def make_subject(template: Template, rng: np.random.Generator, age: int | None = None, sex: str | None = None,
                 atrophy: float | None = None, ventricle_mm: float | None = None) -> Subject:
    """A random new head from the template (no pathology yet); CSF spaces from ``normal_csf``
    unless ``atrophy`` (sulcal widening s) and ``ventricle_mm`` are given."""
    age = int(age if age is not None else rng.integers(18, 95))
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    tissues = {k: getattr(template, k).copy() for k in NORMAL_TISSUES}
    s0, v0 = normal_csf(age, rng)
    a = float(atrophy) if atrophy is not None else s0
    v_mm = float(ventricle_mm) if ventricle_mm is not None else v0
    rim = float(rng.gamma(2.0, 0.6))  # extra-axial CSF space over the convexity (mm), a normal variant
    if a > 0:
        _atrophy(tissues, template, min(a, 1.3))
    if rim > 0.2:
        _extra_axial(tissues, template, rim)
    if v_mm > 0.3:
        enlarge_ventricles(tissues, template, v_mm)
    # head size (by sex, with a realistic spread), pose and position in the scanner
    size = (1.0 if sex == "M" else 0.95) * rng.normal(1.0, 0.055)
    scale = size * np.array([rng.normal(1, 0.03), rng.normal(1, 0.03), rng.normal(1, 0.03)])
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
    return Subject(age, sex, tissues, aff, warp, np.zeros(GRID_SHAPE, np.int16), template, a, v_mm,
                   int(rng.integers(2 ** 31)))


def _atrophy(t: dict[str, np.ndarray], template: Template, a: float) -> None:
    """Widen sulci: grey matter near the brain surface turns to CSF, more with age."""
    depth = template.icv_depth
    loss = np.float32(0.45 * a) * np.exp(-np.maximum(depth - 2.0, 0) / np.float32(4.0 + 4 * a)).astype(np.float32)
    d = t["gm"] * loss
    t["gm"] -= d
    t["csf"] += d


def _extra_axial(t: dict[str, np.ndarray], template: Template, mm: float) -> None:
    """A wider subarachnoid space over the convexity: brain within ``mm`` of the inner table
    becomes CSF (a normal variant, unlabelled)."""
    depth = template.icv_depth
    frac = (np.clip((mm - depth) / 1.0 + 0.5, 0, 1) * (depth > 0)).astype(np.float32)
    for k in ("gm", "wm"):
        d = t[k] * frac
        t[k] -= d
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
    within 2 radii of the centre (the push has faded to 2 % there). Returns (box slices, the
    ball inside the box [bool], source coordinates [3, n] of the ball's voxels).
    """
    reach = int(radius_mm * 2.0) + 2
    lo = np.maximum(np.round(centre_vox).astype(int) - reach, 0)
    hi = np.minimum(np.round(centre_vox).astype(int) + reach, np.array(GRID_SHAPE))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"))
    rel = grid - np.asarray(centre_vox, np.float32)[:, None, None, None]
    r = np.sqrt((rel ** 2).sum(0)) + 1e-3
    ball = r < radius_mm * 2.0
    rel, r, grid = rel[:, ball], r[ball], grid[:, ball]
    mag = push_mm * np.exp(-(r / radius_mm) ** 2) * np.minimum(r / max(radius_mm * 0.3, 1.0), 1.0)
    return sl, ball, grid - rel / r * mag


def deform(t: dict[str, np.ndarray], centre_vox: np.ndarray, push_mm: float, radius_mm: float,
           only: tuple[str, ...] | None = None) -> None:
    """Mass effect: push tissue radially away from ``centre_vox`` (edits ``t`` in place)."""
    sl, ball, src = push_sources(centre_vox, push_mm, radius_mm)
    for k in (only or tuple(t)):
        if k in t and t[k][sl].any():  # an empty channel stays empty under a push
            t[k][sl][ball] = ndimage.map_coordinates(t[k], src, order=1, mode="nearest")


def deform_labels(labels: np.ndarray, centre_vox: np.ndarray, push_mm: float, radius_mm: float) -> None:
    """The same push applied to an integer label map (nearest neighbour), in place."""
    sl, ball, src = push_sources(centre_vox, push_mm, radius_mm)
    labels[sl][ball] = ndimage.map_coordinates(labels, src, order=0, mode="nearest")
