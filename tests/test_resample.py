"""The separable B-spline resampler against an independent 3-D implementation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from neurovfm.errors import IngestError
from neurovfm.ingest.geometry import LAYOUT, StackGeometry, canonicalize, reference_slice_axis
from neurovfm.ingest.nifti import NiftiStack
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.ingest.resample import interpolation_matrix, prefilter


def _smooth_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 100


@pytest.mark.parametrize("order", [1, 3])
def test_matrix_interpolates_samples(order):
    x = np.random.default_rng(1).normal(size=40).astype(np.float32)
    m = interpolation_matrix(np.arange(40, dtype=float), 40, order)
    np.testing.assert_allclose(m @ prefilter(x, order, (0,)), x, atol=1e-4)


def test_matrix_matches_scipy_map_coordinates():
    x = np.random.default_rng(2).normal(size=50)
    pos = np.linspace(-0.4, 49.3, 77)
    ours = interpolation_matrix(pos, 50, 3) @ prefilter(x, 3, (0,))
    ref = ndimage.map_coordinates(x, pos[None], order=3, mode="mirror")
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1), (1, -1, 1)])
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("slice_mm,n_slices", [(3.0, 24), (0.625, 120), (0.75, 90)])
def test_canonicalize_matches_3d_interpolation(flip, order, slice_mm, n_slices):
    """Every canonical voxel equals a 3-D B-spline of the source at that voxel's world point,
    also for thin slices where output positions fall between input slices (0.625, 0.75 mm)."""
    vol = _smooth_volume((70, 60, n_slices))
    spacing = np.array([0.8, 0.9, slice_mm])
    aff = np.diag(np.r_[spacing * np.array(flip), 1.0])
    aff[:3, 3] = [-20.0, 15.0, -30.0]
    geom = StackGeometry(shape=vol.shape, spacing_ij=(spacing[0], spacing[1]), dir_i=aff[:3, 0] / spacing[0],
                         dir_j=aff[:3, 1] / spacing[1], normal=aff[:3, 2] / spacing[2], origin=aff[:3, 3],
                         positions=np.arange(vol.shape[2]) * spacing[2])
    policy = PreprocessPolicy(spline_order=order)
    cv = canonicalize(NiftiStack(vol, geom), policy)
    D, H, W = cv.data.shape
    idx = np.stack(np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij"), -1).reshape(-1, 3)
    world = (cv.affine @ np.c_[idx, np.ones(len(idx))].T)[:3]
    src = np.linalg.solve(aff, np.r_[world, np.ones((1, world.shape[1]))])[:3]
    ref = ndimage.map_coordinates(vol.astype(np.float64), src, order=order, mode="mirror").reshape(D, H, W)
    np.testing.assert_allclose(cv.data, ref, atol=2e-3 * np.abs(vol).max())
    # canonical axes: 4 mm first, then 1 mm; x toward Right, y toward Posterior, z toward Inferior
    assert np.allclose(np.abs(cv.affine[:3, :3]).sum(0), [4, 1, 1])
    for out_axis, world_axis in enumerate(LAYOUT[cv.slice_axis]):
        sign = np.sign(cv.affine[world_axis, out_axis])
        assert sign == (1, -1, -1)[world_axis]  # R, P, I


def test_reference_slice_axis_rule():
    assert reference_slice_axis([512, 512, 150], [0.45, 0.45, 1.0]) == 2
    assert reference_slice_axis([176, 256, 256], [1.0, 1.0, 1.2]) == 0  # sagittal 3-D T1
    assert reference_slice_axis([256, 30, 256], [0.9, 5.0, 0.9]) == 1  # coronal
    assert reference_slice_axis([180, 180, 180], [1.0, 1.0, 1.0]) == 0  # isotropic: the reference picks x
    assert reference_slice_axis([256, 256, 256], [1.0, 1.0, 2.0]) == 2  # reference crashes; we take max spacing


def test_too_small_is_refused():
    vol = np.zeros((10, 10, 3), np.float32)
    geom = StackGeometry(shape=vol.shape, spacing_ij=(1.0, 1.0), dir_i=[1, 0, 0], dir_j=[0, 1, 0], normal=[0, 0, 1],
                         origin=[0, 0, 0], positions=np.arange(3) * 1.0)
    with pytest.raises(IngestError) as e:
        canonicalize(NiftiStack(vol, geom), PreprocessPolicy())
    assert e.value.code == "too_small"


def test_uneven_slices_resampled_on_true_positions():
    """Slices at uneven positions sample a linear ramp; the result is still the ramp."""
    z = np.cumsum(np.r_[0.0, np.where(np.arange(39) % 2, 2.6, 3.4)])  # alternating 2.6 / 3.4 mm steps
    ramp = np.broadcast_to(z[None, None, :] * 2.0, (48, 48, z.size)).astype(np.float32)
    geom = StackGeometry(shape=ramp.shape, spacing_ij=(1.0, 1.0), dir_i=[1, 0, 0], dir_j=[0, 1, 0],
                         normal=[0, 0, 1], origin=[0, 0, 0], positions=z)
    cv = canonicalize(NiftiStack(np.ascontiguousarray(ramp), geom), PreprocessPolicy(spline_order=1))
    zw = cv.affine[2, 0] * np.arange(cv.data.shape[0]) + cv.affine[2, 3]
    np.testing.assert_allclose(cv.data[:, 20, 20], zw * 2.0, atol=1e-3)
