"""Pathology drawn into a subject's template-space tissues, with exact masks and sides.

Each *family* (intraparenchymal haemorrhage, subdural haematoma, infarct in a vascular
territory, glioma, meningioma, fracture, ...) changes tissue fractions (blood, oedema, tumour,
gas, bone gaps...) and, where it occupies space, deforms the brain (mass effect, midline shift,
herniation as real displacements). Each returns the findings it produced for CT and for MR:
label names exactly as in the label files, a side, a size, a location (AAL region) and an
exact mask index into ``subject.lesion_labels``. Normal variants that mimic disease (dense
falx and sinuses, physiological calcification, cavum septum pellucidum, mega cisterna magna,
prominent ventricles with age) are drawn too, without a disease label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from neurovfm.synth.anatomy import Subject, add_tissue, csf_labels, deform, deform_labels
from neurovfm.synth.assets import GRID_SHAPE

ORIGIN = np.array([90.0, 126.0, 72.0])  # template voxel of RAS (0, 0, 0)


@dataclass
class Lesion:
    """One drawn finding, before it is turned into per-modality labels."""

    family: str
    ct_labels: list[str]
    mr_labels: list[str]
    side: str  # left / right / bilateral / midline
    size_mm: float
    location: str
    index: int  # value in subject.lesion_labels
    extra: dict = field(default_factory=dict)


def side_of_x(x_vox: float) -> str:
    """Template voxel x -> patient side (RAS: x < 0 is the patient's left)."""
    return "left" if x_vox - ORIGIN[0] < 0 else "right"


def _region_name(subject: Subject, centre: np.ndarray) -> str:
    c = np.clip(np.round(centre).astype(int), 0, np.array(GRID_SHAPE) - 1)
    lab = int(subject.template.aal[tuple(c)])
    if lab == 0:
        # nearest labelled voxel within a small neighbourhood
        sl = tuple(slice(max(v - 6, 0), v + 7) for v in c)
        sub = subject.template.aal[sl]
        vals = sub[sub > 0]
        if vals.size:
            lab = int(np.bincount(vals).argmax())
    name = subject.template.aal_names.get(lab, "")
    return _pretty(name) if name else "cerebral hemisphere"


_LOBES = {
    "Frontal": "frontal lobe", "Precentral": "frontal lobe", "Supp_Motor": "frontal lobe", "Rectus": "frontal lobe",
    "OFC": "frontal lobe", "Olfactory": "frontal lobe", "Temporal": "temporal lobe", "Heschl": "temporal lobe",
    "Hippocampus": "mesial temporal lobe", "ParaHippocampal": "mesial temporal lobe", "Amygdala": "mesial temporal lobe",
    "Fusiform": "temporal lobe", "Parietal": "parietal lobe", "Postcentral": "parietal lobe", "SupraMarginal": "parietal lobe",
    "Angular": "parietal lobe", "Precuneus": "parietal lobe", "Paracentral": "parietal lobe", "Occipital": "occipital lobe",
    "Calcarine": "occipital lobe", "Cuneus": "occipital lobe", "Lingual": "occipital lobe", "Insula": "insula",
    "Cingulate": "cingulate gyrus", "Caudate": "basal ganglia", "Putamen": "basal ganglia", "Pallidum": "basal ganglia",
    "Thal": "thalamus", "Cerebel": "cerebellar hemisphere", "Vermis": "cerebellar vermis", "Rolandic": "frontal lobe",
}


def _pretty(aal_name: str) -> str:
    for key, lobe in _LOBES.items():
        if aal_name.startswith(key):
            return lobe
    return "cerebral hemisphere"


def _blob(centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator, rough: float = 0.25) -> tuple[tuple[slice, ...], np.ndarray]:
    """Soft ellipsoid with an irregular edge (partial volume about 1 mm), in a bounding box."""
    reach = np.ceil(radii * (1 + rough) + 3).astype(int)
    c = np.round(centre).astype(int)
    lo = np.maximum(c - reach, 0)
    hi = np.minimum(c + reach + 1, np.array(GRID_SHAPE))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    g = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")
    r = np.sqrt(sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, centre, radii)))
    shape = tuple(b - a for a, b in zip(lo, hi))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), max(float(radii.min()) / 2.5, 1.0)).astype(np.float32)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    signed_mm = (1.0 - r + rough * noise) * float(radii.mean())
    return sl, (1.0 / (1.0 + np.exp(-np.clip(signed_mm / 0.6, -40, 40)))).astype(np.float32)


def _full(sl, part: np.ndarray) -> np.ndarray:
    out = np.zeros(GRID_SHAPE, np.float32)
    out[sl] = part
    return out


def _box(centre: np.ndarray, reach: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the template grid within ``reach`` voxels of ``centre`` and the voxel
    coordinates there [..., 3] (so a local shape needs no full-grid arrays)."""
    lo = np.maximum(np.floor(np.asarray(centre) - reach).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(centre) + reach).astype(int) + 1, np.array(GRID_SHAPE))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    g = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"), -1)
    return sl, g


def _mark(subject: Subject, mask: np.ndarray, index: int, thresh: float = 0.5) -> None:
    subject.lesion_labels[(mask >= thresh) & (subject.lesion_labels == 0)] = index


def _random_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    return np.array(np.unravel_index(int(rng.choice(idx)), GRID_SHAPE), float)


def _hemisphere(side: str) -> np.ndarray:
    x = np.arange(GRID_SHAPE[0])[:, None, None] - ORIGIN[0]
    return np.broadcast_to(x < -3 if side == "left" else x > 3, GRID_SHAPE)


def _pick_side(rng) -> str:
    return "left" if rng.random() < 0.5 else "right"


class Painter:
    """Draws families into one subject and collects the lesions."""

    def __init__(self, subject: Subject, rng: np.random.Generator):
        self.s = subject
        self.rng = rng
        self.lesions: list[Lesion] = []
        self.push: list[tuple[np.ndarray, float, float, str]] = []  # (centre, push mm, radius mm, side)

    # -- helpers --------------------------------------------------------------------------------
    def _new(self, family, ct, mr, side, size, centre, extra=None) -> Lesion:
        les = Lesion(family, ct, mr, side, float(round(size, 1)), _region_name(self.s, centre) if centre is not None else "",
                     len(self.lesions) + 1, extra or {})
        self.lesions.append(les)
        return les

    def _brain(self) -> np.ndarray:
        return (self.s.tissues["gm"] + self.s.tissues["wm"]) > 0.6

    def _wm(self) -> np.ndarray:
        return self.s.tissues["wm"] > 0.7

    def _convexity_shell(self, side: str, thickness: float, sector: tuple[float, float] | None = None) -> np.ndarray:
        """Fraction map of a crescent between the brain surface and the inner table."""
        depth = self.s.template.icv_depth
        shell = np.clip((thickness - depth) / 1.0 + 0.5, 0, 1) * (depth > 0)
        shell = shell * _hemisphere(side)
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        shell = shell * (z > -25)  # supratentorial
        if sector is not None:
            y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
            shell = shell * ((y > sector[0]) & (y < sector[1]))
        return shell.astype(np.float32)

    # -- haemorrhage ------------------------------------------------------------------------------
    def iph(self):
        side = _pick_side(self.rng)
        deep = self.rng.random() < 0.5
        regions = ("Putamen", "Thal", "Caudate", "Pallidum") if deep else ("Frontal", "Parietal", "Temporal", "Occipital")
        c = _random_point(self.s.template.region(*regions, side="L" if side == "left" else "R") & self._brain(), self.rng)
        if c is None:
            return
        size = float(self.rng.choice([self.rng.uniform(5, 15), self.rng.uniform(15, 45)], p=[0.45, 0.55]))
        radii = np.array([size / 2] * 3) * self.rng.uniform(0.75, 1.25, 3)
        sl, part = _blob(c, radii, self.rng, 0.2)
        blood = _full(sl, part)
        labels_ct, labels_mr = ["intraparenchymal_hemorrhage"], ["intraparenchymal_hemorrhage"]
        if size > 14:
            sl2, ring = _blob(c, radii + self.rng.uniform(3, 7), self.rng, 0.35)
            add_tissue(self.s.tissues, "edema", np.clip(_full(sl2, ring) - blood, 0, 1) * 0.8, from_=("wm", "gm"))
            labels_ct.append("cerebral_edema")
            labels_mr.append("cerebral_edema")
        add_tissue(self.s.tissues, "blood_acute", blood)
        les = self._new("iph", labels_ct, labels_mr, side, size, c)
        _mark(self.s, blood, les.index)
        if size > 25:
            self.push.append((c, size * 0.35, size * 1.3, side))

    def subdural(self, chronic: bool = False):
        bilateral = chronic and self.rng.random() < 0.25
        sides = ["left", "right"] if bilateral else [_pick_side(self.rng)]
        thick = float(self.rng.uniform(4, 16))
        total = np.zeros(GRID_SHAPE, np.float32)
        for side in sides:
            y0 = self.rng.uniform(-100, -20)
            shell = self._convexity_shell(side, thick, (y0, y0 + self.rng.uniform(70, 130)))
            total = np.maximum(total, shell)
        if total.sum() < 500:
            return
        add_tissue(self.s.tissues, "blood_chronic" if chronic else "blood_acute", total, from_=("csf", "gm", "wm"))
        ct = ["subacute_chronic_subdural_hematoma" if chronic else "acute_subdural_hematoma"]
        c = np.array(ndimage.center_of_mass(total))
        les = self._new("sdh_chronic" if chronic else "sdh_acute", ct, ["subdural_hematoma"],
                        "bilateral" if bilateral else sides[0], thick, c)
        les.location = f"{'bilateral' if bilateral else sides[0]} cerebral convexity"
        _mark(self.s, total, les.index, 0.4)
        if thick > 8 and not bilateral:
            inward = c.copy()
            inward[0] += 25 if sides[0] == "left" else -25
            self.push.append((c, thick * 0.9, 45.0, sides[0]))

    def epidural(self):
        side = _pick_side(self.rng)
        depth = self.s.template.icv_depth
        hemi = _hemisphere(side) & (depth > 0) & (depth < 2.5)
        c = _random_point(hemi & (np.arange(GRID_SHAPE[2])[None, None, :] > ORIGIN[2] - 10), self.rng)
        if c is None:
            return
        size = float(self.rng.uniform(8, 20))
        radii = np.array([size * 0.45, size * 1.6, size * 1.4])
        sl, part = _blob(c, radii, self.rng, 0.1)
        lens = _full(sl, part) * (depth < size * 0.45) * (depth > 0)
        add_tissue(self.s.tissues, "blood_acute", lens, from_=("csf", "gm", "wm"))
        les = self._new("edh", ["epidural_hematoma"], ["epidural_hematoma"], side, size, c)
        _mark(self.s, lens, les.index, 0.4)
        self.push.append((c, size * 0.6, 35.0, side))
        if self.rng.random() < 0.6:
            self.fracture(near=c, side=side)

    def sah(self, aneurysmal: bool = False):
        csf = self.s.tissues["csf"]
        depth = self.s.template.icv_depth
        vent = self.s.template.ventricles
        if aneurysmal:  # basal cisterns and Sylvian fissures
            z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
            region = (z > -25) & (z < 5) & ~vent & (depth > 3)
            side, family, label = "bilateral", "sah_aneurysm", "aneurysmal_subarachnoid_hemorrhage"
        else:
            side = _pick_side(self.rng)
            y0 = self.rng.uniform(-90, 10)
            y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
            region = _hemisphere(side) & (depth < 14) & (y > y0) & (y < y0 + 60) & ~vent
            family, label = "sah_trauma", "traumatic_subarachnoid_hemorrhage"
        frac = (csf * region * self.rng.uniform(0.45, 0.8)).astype(np.float32)
        if frac.sum() < 300:
            return
        add_tissue(self.s.tissues, "blood_acute", frac, from_=("csf",))
        c = np.array(ndimage.center_of_mass(frac))
        les = self._new(family, [label], [label], side, float(np.cbrt(frac.sum())), c)
        les.location = "basal cisterns" if aneurysmal else f"{side} cerebral sulci"
        _mark(self.s, frac, les.index, 0.25)

    def ivh(self):
        vent = self.s.template.ventricles
        y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        dependent = vent & (y < -20) & (z < 25)
        side = self.rng.choice(["left", "right", "bilateral"])
        if side != "bilateral":
            dependent = dependent & _hemisphere(side)
        frac = ndimage.gaussian_filter(dependent.astype(np.float32), 0.7) * self.s.tissues["csf"]
        if frac.sum() < 150:
            return
        add_tissue(self.s.tissues, "blood_acute", frac, from_=("csf",))
        c = np.array(ndimage.center_of_mass(frac))
        les = self._new("ivh", ["intraventricular_hemorrhage"], ["intraventricular_hemorrhage"], str(side),
                        float(np.cbrt(frac.sum()) * 1.5), c)
        les.location = "occipital horns of the lateral ventricles"
        _mark(self.s, frac, les.index, 0.3)

    def contusion(self):
        side = _pick_side(self.rng)
        regions = ("Frontal_Inf", "Frontal_Med_Orb", "Rectus", "Temporal_Pole", "Temporal_Inf", "OFC")
        cortex = self.s.template.region(*regions, side="L" if side == "left" else "R") & (self.s.tissues["gm"] > 0.4)
        c = _random_point(cortex, self.rng)
        if c is None:
            return
        n = int(self.rng.integers(2, 5))
        total = np.zeros(GRID_SHAPE, np.float32)
        for _ in range(n):
            cc = c + self.rng.normal(0, 6, 3)
            sl, part = _blob(cc, np.array([1.0, 1.0, 1.0]) * self.rng.uniform(2.5, 5), self.rng, 0.3)
            total = np.maximum(total, _full(sl, part) * 0.9)
        add_tissue(self.s.tissues, "blood_acute", total * 0.8, from_=("gm", "wm"))
        add_tissue(self.s.tissues, "edema", np.clip(ndimage.gaussian_filter(total, 2.5) * 1.5 - total, 0, 0.6), from_=("gm", "wm"))
        les = self._new("contusion", ["brain_contusion"], ["brain_contusion"], side, 12.0, c)
        _mark(self.s, total, les.index, 0.4)

    # -- ischaemia --------------------------------------------------------------------------------
    TERRITORIES = {
        "MCA": ("Frontal_Inf", "Frontal_Mid", "Precentral", "Postcentral", "Rolandic", "Insula", "SupraMarginal",
                "Temporal_Sup", "Temporal_Mid", "Angular", "Parietal_Inf", "Putamen", "Heschl"),
        "ACA": ("Frontal_Sup_Medial", "Supp_Motor", "Paracentral", "Cingulate_Ant", "Cingulate_Mid", "Frontal_Sup_2",
                "Frontal_Med_Orb", "Rectus"),
        "PCA": ("Calcarine", "Cuneus", "Lingual", "Occipital", "Fusiform", "Temporal_Inf", "Thal", "Hippocampus",
                "ParaHippocampal"),
    }

    def _territory_patch(self, side: str, fraction: tuple[float, float]):
        terr = str(self.rng.choice(list(self.TERRITORIES), p=[0.6, 0.15, 0.25]))
        region = self.s.template.region(*self.TERRITORIES[terr], side="L" if side == "left" else "R")
        region = ndimage.binary_dilation(region, iterations=3) & self._brain() & _hemisphere(side)
        c = _random_point(region, self.rng)
        if c is None:
            return None
        # a patch of the territory around a random centre, cortex and underlying white matter
        radius = self.rng.uniform(*fraction)
        sl, part = _blob(c, np.array([radius] * 3) * self.rng.uniform(0.7, 1.3, 3), self.rng, 0.4)
        patch = _full(sl, part) * region
        return terr, c, patch, radius

    def infarct(self, chronic: bool = False):
        side = _pick_side(self.rng)
        got = self._territory_patch(side, (8, 28) if not chronic else (7, 22))
        if got is None:
            return
        terr, c, patch, radius = got
        if patch.sum() < 60:
            return
        if chronic:
            add_tissue(self.s.tissues, "infarct_chronic", patch * 0.9, from_=("gm", "wm"))
            rim = np.clip(ndimage.gaussian_filter(patch, 1.5) - patch, 0, 1) * 1.5
            add_tissue(self.s.tissues, "gliosis", np.clip(rim, 0, 0.7), from_=("gm", "wm"))
            ct, mr = ["encephalomalacia_gliosis"], ["chronic_ischemic_stroke", "encephalomalacia_gliosis"]
            family = "infarct_chronic"
        else:
            add_tissue(self.s.tissues, "infarct_acute", patch, from_=("gm", "wm"))
            ct = mr = ["acute_ischemic_stroke"]
            family = "infarct_acute"
        les = self._new(family, ct, mr, side, 2 * radius, c, {"territory": terr})
        les.location = f"{side} {terr} territory ({les.location})"
        _mark(self.s, patch, les.index, 0.4)
        if not chronic and radius > 22:
            self.push.append((c, radius * 0.25, radius * 1.5, side))

    def lacune(self):
        side = _pick_side(self.rng)
        deep = self.s.template.region("Putamen", "Thal", "Caudate", "Pallidum", side="L" if side == "left" else "R")
        c = _random_point(deep, self.rng)
        if c is None:
            return
        size = float(self.rng.uniform(4, 12))
        sl, part = _blob(c, np.array([size / 2] * 3), self.rng, 0.15)
        m = _full(sl, part)
        add_tissue(self.s.tissues, "infarct_chronic", m, from_=("gm", "wm"))
        les = self._new("lacune", [], ["lacunar_stroke"], side, size, c)
        _mark(self.s, m, les.index)

    # Fazekas-style grades of chronic small vessel disease: periventricular rim thickness (mm) and
    # deep white-matter foci (count range, radius range mm). 1: pencil-thin lining and punctate
    # foci; 2: a smooth halo and foci beginning to merge; 3: an irregular band reaching into the deep
    # white matter and confluent foci.
    # rim: (thickness mm, (offset, gain, lowest, highest) of the smooth field that makes it patchy)
    SVD_GRADES = {1: ((2.0, (0.5, 0.8, 0.0, 1.5)), (4, 10), (1.5, 3.0)),
                  2: ((4.0, (0.6, 0.6, 0.2, 1.6)), (8, 16), (2.0, 4.5)),
                  3: ((5.5, (0.8, 0.7, 0.4, 1.8)), (12, 24), (3.0, 6.5))}
    SVD_DEGREE = {1: "mild", 2: "moderate", 3: "extensive"}

    def _svd_grade(self) -> int:
        """Grade rises with age: most 50-year-olds with the finding are grade 1, most 85-year-olds 2-3."""
        p3 = float(np.clip((self.s.age - 50) / 90, 0.05, 0.4))
        p2 = 0.35
        return int(self.rng.choice(3, p=[1 - p2 - p3, p2, p3])) + 1

    def _smooth_field(self, sigma_mm: float) -> np.ndarray:
        """Smooth random field in [-1, 1] on the template grid (drawn coarse, then upsampled)."""
        step = 4
        coarse = ndimage.gaussian_filter(self.rng.normal(0, 1, tuple(-(-n // step) for n in GRID_SHAPE)),
                                         sigma_mm / step)
        coarse /= max(float(np.abs(coarse).max()), 1e-6)
        up = ndimage.zoom(coarse.astype(np.float32), step, order=1)
        return up[tuple(slice(0, n) for n in GRID_SHAPE)]

    def small_vessel(self, grade: int | None = None):
        grade = self._svd_grade() if grade is None else grade
        if grade not in self.SVD_GRADES:
            raise ValueError(f"small vessel disease grade must be one of {sorted(self.SVD_GRADES)}, not {grade}")
        (rim_mm, (off, gain, lo, hi)), (n_lo, n_hi), (r_lo, r_hi) = self.SVD_GRADES[grade]
        vd = self.s.template.vent_dist - self.s.ventricle_mm  # mm from the (possibly enlarged) ventricle wall
        wm = self.s.tissues["wm"]
        # periventricular: caps and rim, irregular in thickness along the ventricle
        thick = rim_mm * np.clip(off + gain * self._smooth_field(8.0), lo, hi)
        rim = 1.0 / (1.0 + np.exp(-np.clip((thick - vd) / 0.8, -40, 40)))
        rim = (rim * (vd > 0.5) * np.clip((wm - 0.3) / 0.4, 0, 1)).astype(np.float32)
        # deep white-matter foci, larger and more numerous with grade
        zone = (vd > 3) & (vd < 25) & self._wm()
        total = rim
        for _ in range(int(self.rng.integers(n_lo, n_hi + 1))):
            c = _random_point(zone, self.rng)
            if c is None:
                break
            radii = np.array([1.0, 1.0, 1.0]) * self.rng.uniform(r_lo, r_hi) * self.rng.uniform(0.8, 1.25, 3)
            sl, part = _blob(c, radii, self.rng, 0.3)
            total[sl] = np.maximum(total[sl], part)
        if total.sum() < 50:
            return
        add_tissue(self.s.tissues, "wm_lesion", total * 0.9, from_=("wm", "gm"))
        les = self._new("svd", ["small_vessel_ischemic_disease"], ["small_vessel_ischemic_disease"], "bilateral",
                        2 * max(rim_mm, r_hi), None, {"degree": self.SVD_DEGREE[grade], "fazekas": grade})
        les.location = "periventricular and deep white matter"
        _mark(self.s, total, les.index)

    def demyelination(self):
        """Ovoid lesions perpendicular to the ventricles (Dawson's fingers), periventricular."""
        vd = self.s.template.vent_dist
        zone = (vd > 1) & (vd < 10) & self._wm()
        total = np.zeros(GRID_SHAPE, np.float32)
        for _ in range(int(self.rng.integers(5, 14))):
            c = _random_point(zone, self.rng)
            if c is None:
                break
            radii = np.array([2.0, 2.0, 5.0]) * self.rng.uniform(0.7, 1.6)
            sl, part = _blob(c, radii, self.rng, 0.3)
            total = np.maximum(total, _full(sl, part))
        if total.sum() < 50:
            return
        add_tissue(self.s.tissues, "wm_lesion", total * 0.9, from_=("wm", "gm"))
        les = self._new("ms", [], ["multiple_sclerosis"], "bilateral", 8.0, None)
        les.location = "periventricular white matter"
        _mark(self.s, total, les.index)

    # -- tumours ----------------------------------------------------------------------------------
    def glioma(self):
        side = _pick_side(self.rng)
        c = _random_point(self._wm() & _hemisphere(side) & (self.s.template.vent_dist > 8), self.rng)
        if c is None:
            return
        size = float(self.rng.uniform(15, 50))
        radii = np.array([size / 2] * 3) * self.rng.uniform(0.7, 1.3, 3)
        sl, part = _blob(c, radii, self.rng, 0.35)
        core = _full(sl, part)
        high = size > 25 or self.rng.random() < 0.5
        if high:
            sl_n, nec = _blob(c, radii * 0.55, self.rng, 0.3)
            necrosis = _full(sl_n, nec) * core
            rim = np.clip(core - necrosis, 0, 1)
            add_tissue(self.s.tissues, "enhancing", rim * 0.6, from_=("gm", "wm", "csf"))
            add_tissue(self.s.tissues, "tumour", rim * 0.4, from_=("gm", "wm", "csf"))
            add_tissue(self.s.tissues, "necrosis", necrosis, from_=("gm", "wm", "csf"))
        else:
            add_tissue(self.s.tissues, "tumour", core, from_=("gm", "wm", "csf"))
        sl_e, e = _blob(c, radii + self.rng.uniform(6, 14), self.rng, 0.5)
        edema = np.clip(_full(sl_e, e) - core, 0, 1) * (self.s.tissues["wm"] > 0.3)
        add_tissue(self.s.tissues, "edema", edema * 0.85, from_=("wm",))
        mr = ["high_grade_glioma" if high else "low_grade_glioma", "glioma", "brain_tumor", "cerebral_edema"]
        les = self._new("glioma", ["intra_axial_brain_tumor", "cerebral_edema"], mr, side, size, c)
        _mark(self.s, core, les.index)
        self.push.append((c, size * 0.3, size * 1.4, side))

    def metastases(self):
        n = int(self.rng.integers(2, 7))
        total = np.zeros(GRID_SHAPE, np.float32)
        junction = (self.s.tissues["gm"] > 0.3) & (self.s.tissues["wm"] > 0.3)
        xs = []
        for _ in range(n):
            c = _random_point(junction, self.rng)
            if c is None:
                break
            xs.append(c[0])
            r = float(self.rng.uniform(2.5, 9))
            sl, part = _blob(c, np.array([r] * 3), self.rng, 0.2)
            m = _full(sl, part)
            total = np.maximum(total, m)
            sl_e, e = _blob(c, np.array([r] * 3) + self.rng.uniform(3, 10), self.rng, 0.5)
            add_tissue(self.s.tissues, "edema", np.clip(_full(sl_e, e) - m, 0, 1) * 0.7 * (self.s.tissues["wm"] > 0.3), from_=("wm",))
        if total.sum() < 30:
            return
        add_tissue(self.s.tissues, "enhancing", total * 0.8, from_=("gm", "wm"))
        add_tissue(self.s.tissues, "tumour", total * 0.2, from_=("gm", "wm"))
        sides = {side_of_x(x) for x in xs}
        side = sides.pop() if len(sides) == 1 else "bilateral"
        les = self._new("metastases", ["intra_axial_brain_tumor", "cerebral_edema"], ["brain_metastasis", "brain_tumor", "cerebral_edema"],
                        side, float(2 * np.cbrt(total.sum() * 3 / (4 * np.pi * max(n, 1)))), None, {"count": n})
        les.location = "grey-white matter junction"
        _mark(self.s, total, les.index)

    def meningioma(self):
        side = _pick_side(self.rng)
        depth = self.s.template.icv_depth
        c = _random_point(_hemisphere(side) & (depth > 0.5) & (depth < 2) & (np.arange(GRID_SHAPE[2])[None, None, :] > ORIGIN[2]), self.rng)
        if c is None:
            return
        size = float(self.rng.uniform(10, 45))
        sl, part = _blob(c, np.array([size / 2] * 3) * self.rng.uniform(0.8, 1.2, 3), self.rng, 0.12)
        m = _full(sl, part) * (depth > 0)
        add_tissue(self.s.tissues, "meningioma", m, from_=("csf", "gm", "wm"))
        les = self._new("meningioma", ["extra_axial_brain_tumor"], ["meningioma", "brain_tumor"], side, size, c)
        les.location = f"{side} {les.location.replace('lobe', 'convexity')}"
        _mark(self.s, m, les.index)
        if size > 20:
            self.push.append((c, size * 0.35, size * 1.2, side))

    # -- CSF spaces -------------------------------------------------------------------------------
    def hydrocephalus(self, obstructive: bool = True):
        """The ventricles were enlarged out of proportion to the sulci when the head was built
        (anatomy.disease_csf); here the finding is recorded, with transependymal oedema if obstructive."""
        mm = float(self.s.ventricle_mm)
        if not csf_labels(self.s.sulcal, mm, self.s.age)["ventriculomegaly"]:
            return  # the head does not meet the shape criterion: no label
        rim = ((self.s.template.vent_dist > mm) & (self.s.template.vent_dist < mm + 4)).astype(np.float32)
        if obstructive:
            add_tissue(self.s.tissues, "edema", rim * np.float32(0.55), from_=("wm",))
            les = self._new("hydrocephalus", ["obstructive_hydrocephalus", "ventriculomegaly", "transependymal_flow"],
                            ["obstructive_hydrocephalus", "ventriculomegaly"], "bilateral", mm, None)
        else:
            les = self._new("ventriculomegaly", ["ventriculomegaly"], ["ventriculomegaly"], "bilateral", mm, None)
        les.location = "lateral and third ventricles"
        grown = (self.s.template.vent_dist <= mm) & (self.s.template.icv_depth > 6)
        _mark(self.s, grown.astype(np.float32), les.index)

    def atrophy(self):
        """Sulcal widening advanced for the age, set when the head was built
        (anatomy.disease_csf); recorded here only if the head meets the shape criterion."""
        if not csf_labels(self.s.sulcal, self.s.ventricle_mm, self.s.age)["cerebral_atrophy"]:
            return
        les = self._new("atrophy", ["cerebral_atrophy"], ["cerebral_atrophy"], "bilateral", 0.0, None)
        les.location = "diffuse"

    def arachnoid_cyst(self):
        side = _pick_side(self.rng)
        region = self.s.template.region("Temporal_Pole", side="L" if side == "left" else "R")
        c = _random_point(region, self.rng)
        if c is None:
            return
        size = float(self.rng.uniform(12, 35))
        sl, part = _blob(c, np.array([size / 2] * 3), self.rng, 0.1)
        m = _full(sl, part) * (self.s.template.icv_depth > 0)
        add_tissue(self.s.tissues, "csf", m, from_=("gm", "wm"))
        les = self._new("arachnoid_cyst", ["arachnoid_cyst"], ["arachnoid_cyst"], side, size, c)
        les.location = f"{side} middle cranial fossa"
        _mark(self.s, m, les.index)

    # -- skull, air, surgery ----------------------------------------------------------------------
    def fracture(self, near: np.ndarray | None = None, side: str | None = None):
        side = side or _pick_side(self.rng)
        bone = self.s.tissues["bone"] > 0.5
        if near is None:
            cand = bone & _hemisphere(side) & (np.arange(GRID_SHAPE[2])[None, None, :] > ORIGIN[2] + 5)
            near = _random_point(cand, self.rng)
            if near is None:
                return
        length = float(self.rng.uniform(15, 50))
        width = float(self.rng.uniform(0.8, 2.0))
        d = self.rng.normal(0, 1, 3)
        d /= np.linalg.norm(d)
        sl, g = _box(near, np.hypot(length / 2, 25.0) + 2)  # the crack lies within this box
        rel = g - near.astype(np.float32)
        along = rel @ d.astype(np.float32)
        perp = np.sqrt(np.maximum((rel ** 2).sum(-1) - along ** 2, 0))
        # a plane-like crack: thin in one direction across the skull, long in another
        n2 = np.cross(d, self.rng.normal(0, 1, 3))
        n2 /= np.linalg.norm(n2)
        across = np.abs(rel @ n2.astype(np.float32))
        part = ((np.abs(along) < length / 2) & (across < width / 2) & (perp < 25)).astype(np.float32)
        crack = _full(sl, part) * self.s.tissues["bone"]
        displaced = self.rng.random() < 0.35
        add_tissue(self.s.tissues, "soft", crack * 0.95, from_=("bone",))
        if displaced:
            deform(self.s.tissues, near - (near - ORIGIN) / np.linalg.norm(near - ORIGIN) * 6, float(self.rng.uniform(3, 6)), 9.0,
                   only=("bone", "soft"))
        label = "displaced_skull_fracture" if displaced else "nondisplaced_skull_fracture"
        les = self._new("fracture", [label], [], side_of_x(near[0]), length, near)
        les.location = f"{les.side} calvarium ({les.location.replace(' lobe', '')} bone)"
        _mark(self.s, (crack > 0.3).astype(np.float32), les.index)

    def pneumocephalus(self):
        depth = self.s.template.icv_depth
        y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
        zone = (depth > 0) & (depth < 4) & (y > 20)  # non-dependent: anterior (supine patient)
        n = int(self.rng.integers(1, 6))
        total = np.zeros(GRID_SHAPE, np.float32)
        xs = []
        for _ in range(n):
            c = _random_point(zone, self.rng)
            if c is None:
                break
            xs.append(c[0])
            sl, part = _blob(c, np.array([1.0, 1.0, 1.0]) * self.rng.uniform(1.5, 6), self.rng, 0.2)
            total = np.maximum(total, _full(sl, part) * (depth > 0))
        if total.sum() < 10:
            return
        add_tissue(self.s.tissues, "gas", total, from_=("csf", "gm", "wm"))
        sides = {side_of_x(x) for x in xs}
        les = self._new("pneumocephalus", ["pneumocephalus"], ["pneumocephalus"],
                        sides.pop() if len(sides) == 1 else "bilateral", float(np.cbrt(total.sum()) * 1.2), None)
        les.location = "frontal extra-axial space"
        _mark(self.s, total, les.index, 0.3)

    def craniotomy(self):
        side = _pick_side(self.rng)
        bone = self.s.tissues["bone"] > 0.5
        c = _random_point(bone & _hemisphere(side) & (np.arange(GRID_SHAPE[2])[None, None, :] > ORIGIN[2] + 15), self.rng)
        if c is None:
            return
        r = float(self.rng.uniform(20, 35))
        sl, g = _box(c, r + 3)  # the ring lies within this box
        dist = np.sqrt(((g - c.astype(np.float32)) ** 2).sum(-1))
        ring = _full(sl, ((dist > r - 1.2) & (dist < r + 1.2)).astype(np.float32)) * self.s.tissues["bone"]
        add_tissue(self.s.tissues, "soft", ring, from_=("bone",))
        ct, mr = ["craniotomy", "postsurgical_changes"], ["craniotomy_craniectomy", "postsurgical_changes"]
        # burr holes on the ring
        for _ in range(int(self.rng.integers(1, 4))):
            p = _random_point((ring > 0.3), self.rng)
            if p is not None:
                sl, part = _blob(p, np.array([5.0, 5.0, 5.0]), self.rng, 0.05)
                add_tissue(self.s.tissues, "soft", _full(sl, part) * self.s.tissues["bone"], from_=("bone",))
                if "burr_hole" not in ct:
                    ct.append("burr_hole")
        cavity = None
        if self.rng.random() < 0.7:
            inward = c + (ORIGIN - c) / np.linalg.norm(ORIGIN - c) * (r * 0.8)
            sl, part = _blob(inward, np.array([r * 0.45] * 3), self.rng, 0.3)
            cavity = _full(sl, part) * self._brain()
            add_tissue(self.s.tissues, "csf", cavity * 0.9, from_=("gm", "wm"))
            rim = np.clip(ndimage.gaussian_filter(cavity, 1.5) - cavity, 0, 1) * 1.4
            add_tissue(self.s.tissues, "gliosis", np.clip(rim, 0, 0.6), from_=("gm", "wm"))
            ct.append("resection_cavity")
            mr.append("tumor_resection_cavity")
        les = self._new("craniotomy", ct, mr, side, 2 * r, c)
        les.location = f"{side} {les.location.replace(' lobe', '')} calvarium"
        _mark(self.s, ring, les.index, 0.3)
        if cavity is not None:
            _mark(self.s, cavity, les.index)

    def bg_calcification(self):
        pall = self.s.template.region("Pallidum")
        frac = ndimage.gaussian_filter(pall.astype(np.float32), 0.8) * self.rng.uniform(0.25, 0.6)
        add_tissue(self.s.tissues, "calcification", frac, from_=("gm", "wm"))
        les = self._new("bg_calc", ["basal_ganglia_calcification"], [], "bilateral", 10.0, None)
        les.location = "globi pallidi"
        _mark(self.s, frac, les.index, 0.15)

    def chiari(self):
        cereb = self.s.template.region("Cerebel", "Vermis")
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        tonsils = cereb & (z < -45) & (np.abs(np.arange(GRID_SHAPE[0])[:, None, None] - ORIGIN[0]) < 15)
        if tonsils.sum() < 20:
            return
        c = np.array(ndimage.center_of_mass(tonsils))
        descent = float(self.rng.uniform(6, 14))
        deform(self.s.tissues, c + np.array([0, 0, descent * 1.2]), -descent, 14.0)
        les = self._new("chiari", ["chiari_malformation"], ["chiari_malformation"], "midline", descent, c)
        les.location = "cerebellar tonsils, below the foramen magnum"
        m = np.zeros(GRID_SHAPE, np.float32)
        m[tuple(slice(max(int(v) - 8, 0), int(v) + 8) for v in (c - np.array([0, 0, descent])))] = 1
        _mark(self.s, m * (self.s.tissues["gm"] + self.s.tissues["wm"] > 0.5), les.index)

    # -- normal variants (no disease label unless the label set has them) --------------------------
    def cavum_septum(self):
        x = np.abs(np.arange(GRID_SHAPE[0])[:, None, None] - ORIGIN[0]) < 2.5
        vd = self.s.template.vent_dist
        y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        region = x & (vd < 4) & (y > -5) & (y < 25) & (z > 5) & (z < 25)
        if region.sum() < 20:
            return
        add_tissue(self.s.tissues, "csf", region.astype(np.float32), from_=("gm", "wm"))
        les = self._new("csp", [], ["cavum_septum_pellucidum"], "midline", 5.0, None)
        les.location = "septum pellucidum"
        _mark(self.s, region.astype(np.float32), les.index)

    def mega_cisterna(self):
        cereb = self.s.template.region("Cerebel", "Vermis")
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
        x = np.abs(np.arange(GRID_SHAPE[0])[:, None, None] - ORIGIN[0]) < 14
        region = x & (z < -40) & (y < -75) & (self.s.template.icv_depth > 0) & cereb
        if region.sum() < 50:
            return
        frac = ndimage.gaussian_filter(region.astype(np.float32), 1.0)
        add_tissue(self.s.tissues, "csf", frac, from_=("gm", "wm"))
        les = self._new("mega_cm", ["mega_cisterna_magna"], ["mega_cisterna_magna"], "midline", 12.0, None)
        les.location = "posterior fossa"
        _mark(self.s, frac, les.index)

    def mimics(self):
        """Unlabelled look-alikes: dense falx and sinuses, physiological calcifications."""
        x = np.abs(np.arange(GRID_SHAPE[0])[:, None, None] - ORIGIN[0]) < 1.5
        depth = self.s.template.icv_depth
        if self.rng.random() < 0.5:  # dense falx (mimics a thin subdural or SAH on CT)
            falx = (x & (depth > 2) & (self.s.tissues["csf"] > 0.3)).astype(np.float32) * 0.5
            add_tissue(self.s.tissues, "calcification", falx * self.rng.uniform(0.05, 0.15), from_=("csf",))
        if self.rng.random() < 0.6:  # choroid plexus / pineal calcification
            vent = self.s.template.ventricles
            y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
            glomus = vent & (y < -30) & (y > -45)
            add_tissue(self.s.tissues, "calcification", glomus.astype(np.float32) * self.rng.uniform(0.1, 0.4), from_=("csf",))
        # physiological iron in the deep grey nuclei, growing with age (dark on SWI and T2: a blood mimic)
        load = float(np.clip((self.s.age - 25) / 60, 0.05, 1.0) * self.rng.uniform(0.3, 1.0))
        for names, w in ((("Pallidum",), 0.9), (("Putamen",), 0.35), (("SN_", "Red_N"), 0.8)):
            reg = self.s.template.region(*names)
            box = ndimage.find_objects(reg.astype(np.int8))[0]
            box = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in box)
            frac = np.zeros(GRID_SHAPE, np.float32)
            frac[box] = ndimage.gaussian_filter(reg[box].astype(np.float32), 0.7) * np.float32(load * w)
            add_tissue(self.s.tissues, "iron", frac, from_=("gm", "wm"))

    # -- mass effect ------------------------------------------------------------------------------
    def apply_mass_effect(self):
        """Real deformations from space-occupying lesions; returns nothing, labels the shift."""
        if not self.push:
            return
        before = self._septum_x()
        for c, push, radius, side in self.push:
            deform(self.s.tissues, c, push, radius)
            deform_labels(self.s.lesion_labels, c, push, radius)  # masks move with their tissue
        after = self._septum_x()
        shift = abs(after - before) if before is not None and after is not None else 0.0
        biggest = max(self.push, key=lambda t: t[1])
        side = biggest[3]
        labels_ct, labels_mr = ["brain_mass_effect"], ["brain_mass_effect"]
        if shift >= 3:
            labels_ct.append("midline_shift")
            labels_mr.append("brain_midline_shift")
        if shift >= 9:
            labels_ct.append("brain_herniation")
            labels_mr.append("brain_herniation")
        les = self._new("mass_effect", labels_ct, labels_mr, side, float(round(shift, 1)), biggest[0],
                        {"shift_mm": float(round(shift, 1))})
        les.location = "midline structures" if shift >= 3 else les.location

    def _septum_x(self) -> float | None:
        """x (mm) of the midline CSF between the frontal horns: the septum's position."""
        vent = self.s.tissues["csf"] * (self.s.template.vent_dist < 8)
        y = np.arange(GRID_SHAPE[1])[None, :, None] - ORIGIN[1]
        z = np.arange(GRID_SHAPE[2])[None, None, :] - ORIGIN[2]
        band = vent * ((y > -10) & (y < 20) & (z > 5) & (z < 25))
        if band.sum() < 10:
            return None
        return float(ndimage.center_of_mass(band)[0])


FAMILIES: dict[str, Callable[[Painter], None]] = {
    "iph": Painter.iph,
    "sdh_acute": lambda p: p.subdural(False),
    "sdh_chronic": lambda p: p.subdural(True),
    "edh": Painter.epidural,
    "sah_trauma": lambda p: p.sah(False),
    "sah_aneurysm": lambda p: p.sah(True),
    "ivh": Painter.ivh,
    "contusion": Painter.contusion,
    "infarct_acute": lambda p: p.infarct(False),
    "infarct_chronic": lambda p: p.infarct(True),
    "lacune": Painter.lacune,
    "svd": lambda p: p.small_vessel(),
    "ms": lambda p: p.demyelination(),
    "glioma": Painter.glioma,
    "metastases": Painter.metastases,
    "meningioma": Painter.meningioma,
    "hydrocephalus": lambda p: p.hydrocephalus(True),
    "ventriculomegaly": lambda p: p.hydrocephalus(False),
    "atrophy": Painter.atrophy,
    "arachnoid_cyst": Painter.arachnoid_cyst,
    "fracture": Painter.fracture,
    "pneumocephalus": Painter.pneumocephalus,
    "craniotomy": Painter.craniotomy,
    "bg_calc": Painter.bg_calcification,
    "chiari": Painter.chiari,
    "csp": Painter.cavum_septum,
    "mega_cm": Painter.mega_cisterna,
}
CT_ONLY = {"fracture", "bg_calc"}
MR_ONLY = {"ms", "lacune", "csp"}
