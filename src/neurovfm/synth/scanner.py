"""Scanner physics and protocols: tissue fractions -> CT in HU or MR signal, on a real grid.

CT: tissue HU (partial volume from the fractions), beam-hardening cupping near the skull,
slice-thickness integration, in-plane correlated noise calibrated on the real head-CT slices
in pydicom-data (lag-1 correlation ~0.65-0.7, ~3 HU high-pass SD at 5 mm), soft-tissue or bone
kernels (bone: sharpened, noisier). MR: per-sequence tissue signal, smooth multiplicative
bias field, Gibbs ringing from k-space truncation, Rician noise. A site shifts noise, kernel,
contrast and calibration for external-site test sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from neurovfm.synth.anatomy import Subject, upsample_linear

CT_HU = {
    "gm": 38.0, "wm": 27.0, "csf": 7.0, "bone": 1450.0, "soft": 32.0, "air": -1000.0,
    "blood_acute": 68.0, "blood_chronic": 20.0, "edema": 18.0, "infarct_acute": 21.0, "infarct_chronic": 9.0,
    "gliosis": 17.0, "tumour": 41.0, "necrosis": 14.0, "enhancing": 46.0, "wm_lesion": 16.0,
    "calcification": 380.0, "meningioma": 55.0, "gas": -1000.0, "fat": -90.0, "iron": 41.0,
}
CT_CONTRAST_HU = {"enhancing": 95.0, "meningioma": 110.0, "tumour": 55.0}

MR_SIGNAL = {  # relative signal per sequence (ADC in 1e-6 mm^2/s)
    "T1": dict(gm=600, wm=820, csf=180, bone=90, soft=650, air=0, blood_acute=560, blood_chronic=820, edema=430,
               infarct_acute=540, infarct_chronic=220, gliosis=460, tumour=480, necrosis=240, enhancing=540,
               wm_lesion=640, calcification=320, meningioma=570, gas=0, fat=950, iron=610),
    "T2": dict(gm=720, wm=500, csf=1000, bone=70, soft=480, air=0, blood_acute=230, blood_chronic=850, edema=900,
               infarct_acute=820, infarct_chronic=960, gliosis=860, tumour=800, necrosis=960, enhancing=700,
               wm_lesion=860, calcification=140, meningioma=650, gas=0, fat=700, iron=430),
    "FLAIR": dict(gm=640, wm=480, csf=70, bone=70, soft=480, air=0, blood_acute=520, blood_chronic=800, edema=940,
                  infarct_acute=820, infarct_chronic=140, gliosis=950, tumour=860, necrosis=300, enhancing=760,
                  wm_lesion=950, calcification=200, meningioma=640, gas=0, fat=700, iron=470),
    "DWI": dict(gm=460, wm=400, csf=70, bone=40, soft=140, air=0, blood_acute=210, blood_chronic=300, edema=360,
                infarct_acute=1000, infarct_chronic=90, gliosis=340, tumour=560, necrosis=140, enhancing=500,
                wm_lesion=430, calcification=100, meningioma=520, gas=0, fat=90, iron=400),
    "ADC": dict(gm=820, wm=720, csf=3000, bone=0, soft=1000, air=0, blood_acute=600, blood_chronic=1300,
                edema=1500, infarct_acute=380, infarct_chronic=2700, gliosis=1400, tumour=900, necrosis=2500,
                enhancing=900, wm_lesion=1150, calcification=300, meningioma=820, gas=0, fat=200, iron=760),
    "PD": dict(gm=760, wm=630, csf=820, bone=80, soft=600, air=0, blood_acute=500, blood_chronic=800, edema=860,
               infarct_acute=800, infarct_chronic=810, gliosis=860, tumour=790, necrosis=810, enhancing=760,
               wm_lesion=820, calcification=200, meningioma=700, gas=0, fat=820, iron=660),
    "SWI": dict(gm=600, wm=660, csf=720, bone=50, soft=500, air=0, blood_acute=90, blood_chronic=120, edema=640,
                infarct_acute=600, infarct_chronic=700, gliosis=620, tumour=580, necrosis=700, enhancing=600,
                wm_lesion=650, calcification=90, meningioma=600, gas=0, fat=500, iron=230),
}
MR_SIGNAL["T1C"] = dict(MR_SIGNAL["T1"], enhancing=980, meningioma=960, tumour=620)


@dataclass
class Site:
    """Scanner characteristics of one site (the default and an external one)."""

    name: str = "main"
    ct_noise: float = 1.0  # multiplies the noise SD
    ct_offset_hu: float = 0.0  # calibration offset
    gm_wm_contrast: float = 1.0  # scales the grey-white difference
    kernel_sigma: float = 0.8  # in-plane noise correlation (pixels), soft kernel
    mr_noise: float = 0.03  # Rician noise SD as a fraction of white-matter signal
    thin_fraction: float = 0.1  # how often a CT series is thin-slice
    sagittal_3d_t1: float = 0.5  # how often the T1 is a 3-D sagittal acquisition
    manufacturer: str = "NEUROVFM SYNTH"
    model: str = "SIMCT-64"

    @classmethod
    def named(cls, name: str) -> "Site":
        if name in ("main", "", None):
            return cls()
        # any other name: a different hospital, deterministically derived from the name
        rng = np.random.default_rng(abs(hash_name(name)) % (2 ** 32))
        return cls(name=name, ct_noise=float(rng.uniform(1.25, 1.6)), ct_offset_hu=float(rng.uniform(-4, 4)),
                   gm_wm_contrast=float(rng.uniform(0.75, 0.9)), kernel_sigma=float(rng.uniform(0.55, 0.7)),
                   mr_noise=float(rng.uniform(0.045, 0.06)), thin_fraction=float(rng.uniform(0.2, 0.35)),
                   sagittal_3d_t1=float(rng.uniform(0.6, 0.9)), manufacturer="OTHERVENDOR",
                   model=f"X-{name.upper()[:6]}")


def hash_name(name: str) -> int:
    import hashlib

    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


@dataclass
class Protocol:
    """One series' acquisition: what, in which plane, on which grid."""

    modality: str  # CT | MR
    kind: str  # CT: "soft" | "bone"; MR: sequence family
    plane: str = "axial"
    thickness: float = 5.0
    step: float = 5.0  # spacing between slice centres (> thickness means gaps)
    pixel: float = 0.45
    rows: int = 512
    cols: int = 512
    n_slices: int = 32
    tilt_deg: float = 0.0
    oblique_deg: float = 0.0
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of the field-of-view centre
    contrast: bool = False
    b_value: float | None = None
    description: str = ""
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    extra: dict = field(default_factory=dict)


def slice_geometry(p: Protocol):
    from neurovfm.synth.dicom_writer import axis_aligned_geometry

    return axis_aligned_geometry(p.n_slices, p.rows, p.cols, (p.pixel, p.pixel), p.step, p.plane,
                                 center=p.centre, tilt_deg=p.tilt_deg, oblique_deg=p.oblique_deg)


RENDER_MM = 0.9  # the template is 1 mm: anatomy is rendered no finer than this, then interpolated


def _sample(subject: Subject, volume: np.ndarray, positions, row, col, p: Protocol, order: int = 1,
            subslices: int = 1, labels: np.ndarray | None = None):
    """Sample a template-space volume on the protocol's slices (LPS geometry).

    Thick slices average ``subslices`` planes across the slice thickness (partial volume).
    Fine matrices are rendered on a lattice of about ``RENDER_MM`` and interpolated up (bilinear,
    separable). With ``labels`` (an integer map), returns (planes, label planes),
    the labels sampled by nearest neighbour on the slice centre plane with the same coordinates.
    """
    normal = np.cross(row, col)
    offs = [0.0] if subslices == 1 else list(np.linspace(-p.thickness / 2, p.thickness / 2, subslices + 2)[1:-1])
    out = np.zeros((len(positions), p.rows, p.cols), np.float32 if order else volume.dtype)
    lab = np.zeros((len(positions), p.rows, p.cols), labels.dtype) if labels is not None else None
    step = max(1, int(round(RENDER_MM / p.pixel)))
    n_r, n_c = p.rows // step + 2, p.cols // step + 2
    flip = np.array([-1.0, -1.0, 1.0])
    drow = np.asarray(col, float) * p.pixel * step * flip  # lattice axis 0 runs along the column direction
    dcol = np.asarray(row, float) * p.pixel * step * flip
    if step > 1:
        nr = np.minimum(np.round(np.arange(p.rows) / step).astype(int), n_r - 1)
        nc = np.minimum(np.round(np.arange(p.cols) / step).astype(int), n_c - 1)
    cval = float(volume.min()) if order else 0

    def up(lattice: np.ndarray, linear: bool) -> np.ndarray:
        if step == 1:
            return lattice[:p.rows, :p.cols]
        if linear:
            return upsample_linear(upsample_linear(lattice, p.rows, step, 0), p.cols, step, 1)
        return lattice[nr][:, nc]

    for k, pos in enumerate(positions):
        acc = None
        centre = None
        for o in offs:
            tidx = subject.lattice_index((pos + o * normal) * flip, drow, dcol, n_r, n_c)
            if o == 0.0:
                centre = tidx
            vals = ndimage.map_coordinates(volume, tidx.reshape(-1, 3).T, order=order, mode="constant",
                                           cval=cval).reshape(n_r, n_c)
            acc = vals.astype(np.float32) if acc is None else acc + vals
        out[k] = up(acc / len(offs), True) if order else up(acc, False)
        if labels is not None:
            if centre is None:
                centre = subject.lattice_index(pos * flip, drow, dcol, n_r, n_c)
            lv = ndimage.map_coordinates(labels, centre.reshape(-1, 3).T, order=0, mode="constant", cval=0)
            lab[k] = up(lv.reshape(n_r, n_c), False)
    return out if labels is None else (out, lab)


def ct_series(subject: Subject, p: Protocol, site: Site, rng: np.random.Generator):
    """Planes in HU [n, rows, cols], positions, row, col and the lesion-label planes."""
    hu = dict(CT_HU)
    if p.contrast:
        hu.update(CT_CONTRAST_HU)
    mid = (hu["gm"] + hu["wm"]) / 2
    hu["gm"] = mid + (hu["gm"] - mid) * site.gm_wm_contrast
    hu["wm"] = mid + (hu["wm"] - mid) * site.gm_wm_contrast
    bone_density = rng.uniform(0.8, 1.15)
    hu["bone"] *= bone_density
    vol = subject.property_map(hu)
    # beam hardening: slightly brighter just inside the skull, darker in the centre (cupping)
    depth = subject.template.icv_depth
    vol += np.where(depth > 0, 3.0 * np.exp(-depth / 6.0) - 1.5 * np.clip(depth / 50.0, 0, 1), 0).astype(np.float32)
    vol += np.float32(site.ct_offset_hu + np.clip(rng.normal(0, 1.2), -2.5, 2.5))  # per-scan calibration drift
    positions, row, col = slice_geometry(p)
    sub = 3 if p.thickness >= 2.0 else 1
    planes, labels = _sample(subject, vol, positions, row, col, p, order=1, subslices=sub, labels=subject.lesion_labels)
    # noise: correlated in-plane, scaled with 1/sqrt(thickness); bone kernel sharper and noisier
    base_sd = 4.3 * site.ct_noise * np.sqrt(5.0 / max(p.thickness, 0.5))
    sigma = site.kernel_sigma
    if p.kind == "bone":
        blur = ndimage.gaussian_filter(planes, (0, 1.0, 1.0))
        planes = planes + 1.2 * (planes - blur)
        base_sd *= 6.0
        sigma *= 0.55
    noise = rng.standard_normal(planes.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0, sigma, sigma))
    noise *= np.float32(base_sd / max(noise.std(), 1e-6))
    inside = planes > -900  # no noise texture added in air beyond the scanner's own (kept clean)
    planes = planes + noise * inside
    planes = np.clip(planes, -1024, 3071)
    return planes, positions, row, col, labels


# Susceptibility artefacts of echo-planar and gradient-echo sequences at the air-bone interfaces of
# the skull base (frontal sinus, mastoids / petrous bones): signal pile-up (bright) beside dropout
# (dark) on DWI, dark on SWI, unreliable ADC. Unlabelled; they mimic infarcts on DWI and blood on
# SWI for anyone who looks at intensities only. Drawn per head (subject.seed), so a study's DWI,
# ADC and SWI agree. Factors multiply the signal: (pile-up, dropout).
SUSCEPTIBILITY = {"DWI": (2.6, 0.25), "ADC": (0.55, 1.6), "SWI": (0.15, 0.15)}
_AIR_BONE_RAS = ((0.0, 52.0, -8.0), (-42.0, -22.0, -28.0), (42.0, -22.0, -28.0), (0.0, 30.0, -30.0))


def _susceptibility(vol: np.ndarray, subject: Subject, kind: str) -> None:
    from neurovfm.synth.pathology import ORIGIN, _blob

    rng = np.random.default_rng([subject.seed, 31])
    up, down = SUSCEPTIBILITY[kind]
    for ras in _AIR_BONE_RAS:
        if rng.random() > 0.45:
            continue
        centre = ORIGIN + np.array(ras) + rng.normal(0, 4, 3)
        for factor, shift in ((down, 0.0), (up, 1.0)):
            radii = rng.uniform(5, 16, 3) * (0.7 if shift else 1.0)
            c = centre + shift * np.array([0.0, 0.0, radii[2] * 1.2])  # pile-up just above the dropout
            sl, part = _blob(c, radii, rng, 0.3)
            vol[sl] *= 1 + np.float32(factor - 1) * part


def mr_series(subject: Subject, p: Protocol, site: Site, rng: np.random.Generator):
    """Planes in arbitrary scanner units [n, rows, cols], geometry and lesion-label planes."""
    table = dict(MR_SIGNAL[p.kind])
    mid = (table["gm"] + table["wm"]) / 2
    table["gm"] = mid + (table["gm"] - mid) * site.gm_wm_contrast
    table["wm"] = mid + (table["wm"] - mid) * site.gm_wm_contrast
    vol = subject.property_map(table)
    if p.kind in SUSCEPTIBILITY:
        _susceptibility(vol, subject, p.kind)
    positions, row, col = slice_geometry(p)
    planes, labels = _sample(subject, vol, positions, row, col, p, order=1, subslices=2 if p.thickness >= 2 else 1,
                             labels=subject.lesion_labels)
    # Gibbs ringing: keep the central 80 % of k-space in-plane (single precision FFT)
    r, c = planes.shape[1:]
    keep_r, keep_c = int(r * 0.4), int(c * 0.4)
    f = sfft.fft2(planes.astype(np.complex64), axes=(1, 2))
    mask = np.zeros((r, c), bool)
    mask[r // 2 - keep_r:r // 2 + keep_r, c // 2 - keep_c:c // 2 + keep_c] = True
    f *= sfft.ifftshift(mask)
    planes = np.abs(sfft.ifft2(f, axes=(1, 2))).astype(np.float32)
    # smooth multiplicative bias field (separable: slice factor x in-plane factor)
    n = planes.shape[0]
    yy, xx = np.meshgrid(np.linspace(-1, 1, r), np.linspace(-1, 1, c), indexing="ij")
    zz = np.linspace(-1, 1, n)
    coef = rng.normal(0, 0.12, 6)
    inplane = np.exp(coef[0] * xx + coef[1] * yy + coef[3] * xx * yy + coef[4] * xx ** 2 + coef[5] * yy ** 2)
    planes *= np.exp(coef[2] * zz).astype(np.float32)[:, None, None]
    planes *= inplane.astype(np.float32)[None]
    sd = np.float32(site.mr_noise * table["wm"] if p.kind != "ADC" else site.mr_noise * 700)
    n1 = rng.standard_normal(planes.shape, dtype=np.float32) * sd
    n2 = rng.standard_normal(planes.shape, dtype=np.float32) * sd
    planes = np.sqrt((planes + n1) ** 2 + n2 ** 2)
    scale = rng.uniform(0.8, 3.0)  # arbitrary scanner units
    return np.clip(planes * np.float32(scale), 0, 65000), positions, row, col, labels
