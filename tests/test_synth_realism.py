"""Synthetic anatomy and physics, checked in numbers against stated realism targets and
against real head-CT slices from pydicom-data."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage

from neurovfm.synth.anatomy import make_subject
from neurovfm.synth.assets import load_template
from neurovfm.synth.pathology import FAMILIES, Painter
from neurovfm.synth.scanner import Protocol, Site, _sample, ct_series, mr_series, slice_geometry


@pytest.fixture(scope="module")
def template():
    return load_template()


@pytest.fixture(scope="module")
def sick(template):
    rng = np.random.default_rng(42)
    s = make_subject(template, rng, age=60)
    p = Painter(s, rng)
    FAMILIES["iph"](p)
    FAMILIES["infarct_acute"](p)
    return s, p


def _frac(subject, name, prot):
    pos, row, col = slice_geometry(prot)
    return _sample(subject, subject.tissues[name], pos, row, col, prot, order=1, subslices=1)


def _hp_noise(img, mask):
    hp = img - ndimage.uniform_filter(img, 9)
    z = hp * mask
    lag1 = (z[:, 1:] * z[:, :-1]).sum() / max((z ** 2).sum(), 1e-9)
    return float(hp[mask].std()), float(lag1)


def test_ct_hounsfield_units_per_tissue(sick):
    s, p = sick
    prot = Protocol("CT", "soft", n_slices=30, step=5.0, thickness=5.0, pixel=0.5, rows=448, cols=448,
                    centre=tuple(s.world_from_template[:3, 3] * [-1, -1, 1]))
    hu, pos, row, col, labels = ct_series(s, prot, Site(), np.random.default_rng(0))
    means = {}
    for name in ("gm", "wm", "csf", "bone", "air"):
        f = _frac(s, name, prot)
        m = ndimage.binary_erosion(f > (0.8 if name == "bone" else 0.95), iterations=1)  # skull is thin
        assert m.sum() > 100, name  # enough pure voxels for a median (older heads have thinner cortex)
        means[name] = float(np.median(hu[m]))
    blood_idx = [les.index for les in p.lesions if les.family == "iph"][0]
    bm = ndimage.binary_erosion(labels == blood_idx, iterations=1)
    assert bm.sum() > 5
    means["blood"] = float(np.median(hu[bm]))
    assert 35 <= means["gm"] <= 45, means
    assert 20 <= means["wm"] <= 30, means
    assert 0 <= means["csf"] <= 15, means
    assert 50 <= means["blood"] <= 90, means
    assert means["bone"] > 700, means
    assert means["air"] < -900, means


def test_ct_noise_texture_like_real_head_ct(sick):
    """White-matter noise (high-pass SD) and its lag-1 correlation vs the real 5 mm head CTs."""
    real = []
    for name in ("693_UNCR.dcm", "J2K_pixelrep_mismatch.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        a = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        m = ndimage.binary_erosion((a > 15) & (a < 60), iterations=6)
        real.append(_hp_noise(a[None], m[None]))
    s, _ = sick
    prot = Protocol("CT", "soft", n_slices=12, step=5.0, thickness=5.0, pixel=0.47, rows=512, cols=512,
                    centre=tuple(s.world_from_template[:3, 3] * [-1, -1, 1]))
    hu, *_ = ct_series(s, prot, Site(), np.random.default_rng(1))
    wm = ndimage.binary_erosion(_frac(s, "wm", prot) > 0.95, iterations=3)
    sd, lag1 = _hp_noise(hu, wm)
    real_sd = np.mean([r[0] for r in real])
    real_lag = np.mean([r[1] for r in real])
    assert 0.6 * real_sd <= sd <= 1.6 * real_sd, (sd, real)
    assert abs(lag1 - real_lag) < 0.15, (lag1, real)


def test_bone_kernel_noisier_and_sharper(sick):
    s, _ = sick
    kw = dict(n_slices=8, step=5.0, thickness=5.0, pixel=0.47, rows=512, cols=512,
              centre=tuple(s.world_from_template[:3, 3] * [-1, -1, 1]))
    soft, *_ = ct_series(s, Protocol("CT", "soft", **kw), Site(), np.random.default_rng(2))
    bone, *_ = ct_series(s, Protocol("CT", "bone", **kw), Site(), np.random.default_rng(2))
    wm = ndimage.binary_erosion(_frac(s, "wm", Protocol("CT", "soft", **kw)) > 0.95, iterations=3)
    assert _hp_noise(bone, wm)[0] > 3 * _hp_noise(soft, wm)[0]


def test_mr_contrast_ordering(sick):
    s, p = sick
    prot = dict(n_slices=24, step=6.0, thickness=5.0, pixel=0.9, rows=256, cols=256,
                centre=tuple(s.world_from_template[:3, 3] * [-1, -1, 1]))
    csf = wm = None
    vals = {}
    for seq in ("T1", "T2", "FLAIR", "DWI", "ADC"):
        pr = Protocol("MR", seq, **prot)
        img, pos, row, col, labels = mr_series(s, pr, Site(), np.random.default_rng(3))
        if csf is None:
            csf = ndimage.binary_erosion(_frac(s, "csf", pr) > 0.95, iterations=1)
            wm = ndimage.binary_erosion(_frac(s, "wm", pr) > 0.95, iterations=2)
            inf_idx = [les.index for les in p.lesions if les.family == "infarct_acute"][0]
            infarct = ndimage.binary_erosion(labels == inf_idx, iterations=1)
        vals[seq] = (np.median(img[csf]), np.median(img[wm]), np.median(img[infarct]) if infarct.any() else None)
    assert vals["T1"][0] < 0.5 * vals["T1"][1]  # CSF dark on T1
    assert vals["FLAIR"][0] < 0.5 * vals["FLAIR"][1]  # CSF dark on FLAIR
    assert vals["T2"][0] > 1.5 * vals["T2"][1]  # CSF bright on T2
    assert vals["DWI"][2] is not None and vals["DWI"][2] > 1.5 * vals["DWI"][1]  # acute infarct bright on DWI
    assert vals["ADC"][2] < 0.8 * vals["ADC"][1]  # and dark on ADC


def test_subjects_differ_and_are_deterministic(template):
    a = make_subject(template, np.random.default_rng(5))
    b = make_subject(template, np.random.default_rng(5))
    c = make_subject(template, np.random.default_rng(6))
    np.testing.assert_array_equal(a.world_from_template, b.world_from_template)
    np.testing.assert_array_equal(a.tissues["gm"], b.tissues["gm"])
    assert not np.allclose(a.world_from_template, c.world_from_template)
    assert not np.allclose(a.warp, c.warp)


@pytest.fixture(scope="module")
def svd_by_grade(template):
    """The same 75-year-old head with small vessel disease of each grade."""
    out = {}
    for grade in (1, 2, 3):
        rng = np.random.default_rng(11)
        s = make_subject(template, rng, age=75)
        p = Painter(s, rng)
        p.small_vessel(grade=grade)
        out[grade] = (s, p.lesions[0])
    return out


def test_small_vessel_disease_grows_with_grade_and_hugs_the_ventricles(svd_by_grade):
    vols = {}
    for grade, (s, les) in svd_by_grade.items():
        m = s.lesion_labels == les.index
        vols[grade] = m.sum() / 1000.0  # mL (1 mm template voxels)
        wall = s.template.vent_dist - s.ventricle_mm
        near = m & (wall > 0) & (wall < 8)
        assert near.sum() > 0.35 * m.sum(), grade  # periventricular caps / rim, not only scattered foci
        assert les.extra["fazekas"] == grade and les.side == "bilateral"
    # Fazekas-like volumes: grade 1 a few mL, grade 3 tens of mL
    assert 1.5 < vols[1] < 15 and vols[1] < vols[2] < vols[3] and 30 < vols[3] < 150, vols
    assert [svd_by_grade[g][1].extra["degree"] for g in (1, 2, 3)] == ["mild", "moderate", "extensive"]


def test_small_vessel_disease_visible_on_ct_and_flair(svd_by_grade):
    s, les = svd_by_grade[3]
    centre = tuple(s.world_from_template[:3, 3] * [-1, -1, 1])
    prot = Protocol("CT", "soft", n_slices=20, step=5.0, thickness=5.0, pixel=0.5, rows=448, cols=448, centre=centre)
    hu, pos, row, col, labels = ct_series(s, prot, Site(), np.random.default_rng(0))
    lesion = ndimage.binary_erosion(labels == les.index, iterations=1)
    wm = ndimage.binary_erosion(_frac(s, "wm", prot) > 0.95, iterations=2) & ~ndimage.binary_dilation(
        labels == les.index, iterations=3)
    assert lesion.sum() > 100 and wm.sum() > 100
    drop = float(np.median(hu[wm]) - np.median(hu[lesion]))
    # leukoaraiosis on real head CT: ~15-22 HU against 28-32 HU normal white matter
    assert 6.0 < drop < 14.0, drop  # hypodense white matter, darker than white matter, not CSF-dark
    pr = Protocol("MR", "FLAIR", n_slices=24, step=6.0, thickness=5.0, pixel=0.9, rows=256, cols=256, centre=centre)
    img, pos, row, col, labels = mr_series(s, pr, Site(), np.random.default_rng(3))
    lesion = ndimage.binary_erosion(labels == les.index, iterations=1)
    wm = ndimage.binary_erosion(_frac(s, "wm", pr) > 0.95, iterations=2) & ~ndimage.binary_dilation(
        labels == les.index, iterations=2)
    assert np.median(img[lesion]) > 1.3 * np.median(img[wm])  # bright on FLAIR


def test_small_vessel_grade_is_checked(template):
    rng = np.random.default_rng(0)
    p = Painter(make_subject(template, rng, age=70), rng)
    for bad in (0, 4):  # 0 is not "no grade given"
        with pytest.raises(ValueError, match="grade"):
            p.small_vessel(grade=bad)
