"""Orientation: a marker on the patient's left stays on the left of the token grid.

Series of one asymmetric phantom are acquired axial, coronal, sagittal, oblique and gantry
tilted, in both slice orders and with shuffled instance numbers. After ingestion the marker
must sit in the left half of the grid axis that runs along left-right, and its token must map
back through the grid affine to the marker's scanner position within half a token.
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
from scipy import ndimage

from neurovfm.ingest.dicom_headers import read_header
from neurovfm.ingest.dicom_series import build_stack, group_records
from neurovfm.ingest.geometry import LAYOUT, canonicalize
from neurovfm.ingest.policy import DEFAULT_POLICY
from neurovfm.tokens.patches import tokenize

from neurovfm.synth.phantom import MARKER_LPS, write_phantom_series

MARKER_RAS = MARKER_LPS * np.array([-1, -1, 1])

CASES = [
    ("axial", 0, 0, False, False),
    ("axial", 0, 0, True, True),
    ("coronal", 0, 0, False, True),
    ("coronal", 0, 0, True, False),
    ("sagittal", 0, 0, False, False),
    ("sagittal", 0, 0, True, True),
    ("axial", 0, 18, False, True),  # oblique
    ("coronal", 0, -25, True, False),  # oblique
    ("axial", 20, 0, False, True),  # gantry tilt
    ("axial", -12, 0, True, False),  # gantry tilt, reversed order
]


def _ingest(tmp_path, plane, tilt, obl, rev, shuffle, rows=220):
    write_phantom_series(str(tmp_path / "s"), plane, tilt_deg=tilt, oblique_deg=obl, reverse=rev, shuffle=shuffle,
                         ps=(0.9, 0.9), rows=rows, cols=210, step=3.0, n=56)
    recs = [r for f in sorted(glob.glob(str(tmp_path / "s" / "*"))) for r in read_header(f)]
    cands = group_records(recs)
    assert len(cands) == 1
    stack = build_stack(cands[0], DEFAULT_POLICY)
    cv = canonicalize(stack, DEFAULT_POLICY)
    return stack, cv, tokenize(cv, "CT", DEFAULT_POLICY)


def _marker_centre(data: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of the largest bright blob (the marker)."""
    mask = data > 220
    lab, n = ndimage.label(mask)
    assert n >= 1
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    blob = lab == (int(np.argmax(sizes)) + 1)
    assert blob.sum() > 20
    return np.array(ndimage.center_of_mass(np.where(blob, data - 35.0, 0.0)))


@pytest.mark.parametrize("plane,tilt,obl,rev,shuffle", CASES)
def test_marker_stays_left_and_maps_back(tmp_path, plane, tilt, obl, rev, shuffle):
    stack, cv, ts = _ingest(tmp_path, plane, tilt, obl, rev, shuffle)
    assert cv.plane == plane
    assert cv.tilt_corrected == (tilt != 0)
    # canonical spacing: 4 mm along the slice axis (first), 1 mm in-plane
    norms = np.linalg.norm(cv.affine[:3, :3], axis=0)
    np.testing.assert_allclose(norms, [4.0, 1.0, 1.0], atol=1e-6)
    # the marker (400 HU inside ~35 HU brain) in voxel space
    centre_vox = _marker_centre(cv.data)
    world = cv.affine @ np.r_[centre_vox, 1.0]
    assert np.linalg.norm(world[:3] - MARKER_RAS) < 2.5, (world[:3], MARKER_RAS)
    # left-right grid axis: x (RAS) increases toward patient Right, so Left = low indices
    lr_axis = LAYOUT[cv.slice_axis].index(0)
    grid_len = ts.grid_shape[lr_axis]
    # find the marker's token via the stored grid: the foreground token closest to the marker
    tok_world = (ts.grid_affine @ np.c_[ts.coords.astype(float), np.ones(ts.n_tokens)].T).T[:, :3]
    best = int(np.argmin(np.linalg.norm(tok_world - MARKER_RAS, axis=1)))
    half_token = 0.5 * np.linalg.norm(ts.grid_affine[:3, :3], axis=0).max()
    assert np.linalg.norm(tok_world[best] - MARKER_RAS) <= np.sqrt(3) * half_token
    assert ts.coords[best, lr_axis] < grid_len / 2, "marker must be in the patient-left half of the grid"
    # and along every axis the token containing the marker centre is within half a token
    inv = np.linalg.inv(ts.grid_affine)
    tok_idx = inv @ np.r_[MARKER_RAS, 1.0]
    tok_vox = np.linalg.inv(cv.affine) @ np.r_[MARKER_RAS, 1.0]
    np.testing.assert_allclose(tok_idx[:3], (tok_vox[:3] - np.array([1.5, 7.5, 7.5])) / np.array([4, 16, 16]), atol=1e-6)


def test_all_planes_agree_on_the_marker(tmp_path):
    """The same phantom seen in three planes: marker world positions agree."""
    found = []
    for plane in ("axial", "coronal", "sagittal"):
        _, cv, _ = _ingest(tmp_path / plane, plane, 0, 0, False, False)
        found.append((cv.affine @ np.r_[_marker_centre(cv.data), 1.0])[:3])
    spread = np.ptp(np.array(found), axis=0)
    assert spread.max() < 3.0


def _centre_curve(cv):
    m = (cv.data > 25) & (cv.data < 45)
    zs, ys = [], []
    for d in range(m.shape[0]):
        if m[d].sum() > 500:
            c = np.argwhere(m[d]).mean(0)
            w = (cv.affine @ np.r_[d, c, 1.0])[:3]
            zs.append(w[2])
            ys.append(w[1])
    order = np.argsort(zs)
    return np.array(zs)[order], np.array(ys)[order]


def _max_gap(a, b):
    (z0, y0), (z1, y1) = a, b
    lo, hi = max(z0.min(), z1.min()), min(z0.max(), z1.max())
    assert hi - lo > 60
    grid = np.linspace(lo, hi, 30)
    return float(np.abs(np.interp(grid, z0, y0) - np.interp(grid, z1, y1)).max())


def test_tilt_correction_restores_shape(tmp_path):
    """A 20-degree gantry tilt shears the stack by tan(20) mm per mm of height; after
    correction the brain's per-slice centre (world space) follows the untilted scan's.
    Control: the same stack with the measured shear ignored is off by many millimetres."""
    # a tall field of view, so the sheared stack never cuts the head off
    _, cv_flat, _ = _ingest(tmp_path / "flat", "axial", 0, 0, False, False, rows=320)
    stack, cv_tilt, _ = _ingest(tmp_path / "tilt", "axial", 20, 0, False, False, rows=320)
    flat, tilt = _centre_curve(cv_flat), _centre_curve(cv_tilt)
    assert _max_gap(flat, tilt) < 2.0
    stack.geometry.shifts[:] = 0.0  # pretend the shear was not there
    naive = _centre_curve(canonicalize(stack, DEFAULT_POLICY))
    assert _max_gap(flat, naive) > 8.0


def test_tilted_grid_covers_every_shifted_plane(tmp_path):
    """With a tight field of view, the sheared planes reach beyond the first plane's extent; the
    canonical grid must still hold all of them (the whole head becomes tokens), as the untilted
    scan of the same phantom does."""
    _, cv_flat, _ = _ingest(tmp_path / "flat", "axial", 0, 0, False, False, rows=220)
    _, cv_tilt, _ = _ingest(tmp_path / "tilt", "axial", 20, 0, False, False, rows=220)

    def y_extent(cv):
        ijk = np.argwhere(cv.data > -500)
        ys = (cv.affine[:3, :3] @ ijk.T.astype(float))[1] + cv.affine[1, 3]
        return ys.min(), ys.max()

    f, t = y_extent(cv_flat), y_extent(cv_tilt)
    assert abs(f[0] - t[0]) < 6.0 and abs(f[1] - t[1]) < 6.0, (f, t)
