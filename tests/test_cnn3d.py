"""The end-to-end 3-D CNN baseline (neurovfm.probe.cnn3d): which labels choose the epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurovfm.eval.metrics import auroc
from neurovfm.probe import cnn3d as C


def _world(n_train=8, n_val=6, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"t{i}" for i in range(n_train)] + [f"v{i}" for i in range(n_val)]
    vols = {k: rng.random((1,) + C.GRID).astype(np.float16) for k in keys}
    y = {k: np.array([i % 2, (i // 2) % 2, np.nan if i == 3 else 1 - i % 2], np.float32) for i, k in enumerate(keys)}
    age = {k: 40.0 + i for i, k in enumerate(keys)}
    return keys[:n_train], keys[n_train:], vols, y, age


@pytest.mark.parametrize("select", [[0], [1], [0, 1], None])
def test_validation_auroc_is_over_the_selected_columns(select):
    """With one epoch the kept model is that epoch's, so its recorded validation AUROC must be the
    macro AUROC of its validation scores over exactly the selected columns (all by default)."""
    train, val, vols, y, age = _world()
    cfg = C.CNNConfig(epochs=1, batch=4, seed=0, threads=1)
    res = C.train_cnn(vols, age, y, train, val, val, cfg, select=select)
    cols = [0, 1, 2] if select is None else select
    yv = np.stack([y[k] for k in val])
    lv = np.stack([res.logits[k] for k in val])
    assert lv.shape == (len(val), 3)  # every column is trained and scored, whatever selects
    want = np.nanmean([auroc(yv[:, j], lv[:, j]) for j in cols])
    assert res.val_macro_auroc == pytest.approx(want)
    assert res.history[0]["val_macro_auroc"] == pytest.approx(want)


def test_bad_selection_is_refused():
    train, val, vols, y, age = _world()
    cfg = C.CNNConfig(epochs=1, batch=4, seed=0, threads=1)
    for bad in ([], [3], [-1]):
        with pytest.raises(ValueError, match="selection columns"):
            C.train_cnn(vols, age, y, train, val, val, cfg, select=bad)


def _blob_at(mm_xyz, grid=C.DEFAULT_GRID):
    """A one-voxel-wide bright spot at a physical offset (R, A, S in mm) from the grid centre."""
    x = torch.zeros((1, 1) + grid.shape)
    idx = [int(round((n - 1) / 2 + mm / sp)) for n, mm, sp in zip(grid.shape, mm_xyz[::-1], grid.mm)]
    x[0, 0, idx[0], idx[1], idx[2]] = 1.0
    return torch.nn.functional.max_pool3d(x, 3, 1, 1)  # 3 voxels wide, so it survives resampling


def _centre_mm(x, grid=C.DEFAULT_GRID):
    """Intensity-weighted centre of a [1, 1, *grid.shape] volume in mm from the grid centre (x=R, y=A, z=S)."""
    w = x[0, 0].numpy().astype(float)
    axes = [(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(grid.shape, grid.mm)]
    d, h, ww = np.meshgrid(*axes, indexing="ij")
    return np.array([(ww * w).sum(), (h * w).sum(), (d * w).sum()]) / w.sum()


def test_identity_warp_changes_nothing():
    x = torch.rand((2, 3) + C.GRID)
    theta = torch.stack([C.affine_theta((0.0, 0.0, 0.0))] * 2)
    torch.testing.assert_close(C.warp(x, theta), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("angles, zoom, start, motion", [
    ((0.0, 0.0, 90.0), 1.0, (30.0, 0.0, 0.0), [[0, -1, 0], [1, 0, 0], [0, 0, 1]]),   # about S-I: right -> anterior
    ((0.0, 0.0, -90.0), 1.0, (0.0, 45.0, 0.0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # about S-I the other way
    ((90.0, 0.0, 0.0), 1.0, (0.0, 24.0, 0.0), [[1, 0, 0], [0, 0, -1], [0, 1, 0]]),   # about L-R: anterior -> superior
    ((0.0, 0.0, 0.0), 1.2, (30.0, -20.0, 12.0), np.eye(3) * 1.2),                    # zoom: distances x 1.2
])
@pytest.mark.parametrize("inplane", [3.0, 2.0])
def test_rotation_and_zoom_move_the_head_in_millimetres(angles, zoom, start, motion, inplane):
    """Rotations are rigid in millimetres on the anisotropic grid (3 or 2 mm in-plane, 4 mm slices):
    a point keeps its distance from the centre and lands where the rotation says (a rotation
    written in normalised units would stretch 30 mm right into 36 mm anterior)."""
    grid = C.StudyGrid.of(inplane)
    blob = _blob_at(start, grid)
    moved = C.warp(blob, C.affine_theta(angles, zoom=zoom, grid=grid)[None])
    np.testing.assert_allclose(_centre_mm(moved, grid), np.asarray(motion, float) @ _centre_mm(blob, grid), atol=1.0)


def test_random_affine_is_seeded_and_bounded():
    a = C.random_affine(4, 10.0, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(a, C.random_affine(4, 10.0, 0.1, np.random.default_rng(0)))
    assert a.shape == (4, 3, 4) and not torch.allclose(a[0], a[1])
    assert torch.allclose(C.random_affine(2, 0.0, 0.0, np.random.default_rng(1)), torch.stack([C.affine_theta((0, 0, 0))] * 2))
    with pytest.raises(ValueError, match="rotate_deg"):
        C.CNNConfig(rotate_deg=90)


def test_seed_ensemble_is_the_mean_logit_of_its_members_and_member_zero_is_the_single_run():
    """``CNNConfig.ensemble``: member i is exactly the single network of seed ``seed + i`` (the
    same data order and initialisation), and the study scores are the members' mean logit."""
    train, val, vols, y, age = _world()
    single = C.train_cnn(vols, age, y, train, val, val, C.CNNConfig(epochs=1, batch=4, seed=3, threads=1))
    other = C.train_cnn(vols, age, y, train, val, val, C.CNNConfig(epochs=1, batch=4, seed=4, threads=1))
    ens = C.train_cnn(vols, age, y, train, val, val, C.CNNConfig(epochs=1, batch=4, seed=3, threads=1, ensemble=2))
    assert single.members == [] and len(ens.members) == 2
    for k in val:
        np.testing.assert_allclose(ens.members[0].logits[k], single.logits[k], rtol=1e-6)
        np.testing.assert_allclose(ens.members[1].logits[k], other.logits[k], rtol=1e-6)
        np.testing.assert_allclose(ens.logits[k], (single.logits[k] + other.logits[k]) / 2, rtol=1e-6)
    assert not np.allclose(single.logits[val[0]], other.logits[val[0]])  # the seeds differ
    # the ensemble's validation AUROC is its own, over its mean logits
    yv = np.stack([y[k] for k in val])
    want = np.nanmean([auroc(yv[:, j], np.stack([ens.logits[k] for k in val])[:, j]) for j in range(3)])
    assert ens.val_macro_auroc == pytest.approx(want)


def test_ensemble_size_is_validated():
    with pytest.raises(ValueError, match="ensemble"):
        C.CNNConfig(ensemble=0)


def _series_affine(spacing=(4.0, 1.0, 1.0), origin=(-60.0, -80.0, -70.0)) -> np.ndarray:
    """An axial series' voxel -> RAS affine: axis 0 = slices (S), 1 = rows (A), 2 = columns (R)."""
    a = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 2] = spacing
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("spacing, widths", [
    ((4.0, 1.0, 1.0), (1, 3, 3)),   # the cache's 1 mm in-plane, 4 mm slices
    ((1.0, 1.0, 4.0), (3, 3, 1)),   # another plane: the thick axis is left alone whichever it is
    ((4.0, 1.5, 1.5), (1, 3, 3)),   # 1.5 mm -> nearest odd width to 2
    ((4.0, 3.0, 3.0), (1, 1, 1)),   # already at the grid's spacing: nothing to average
])
def test_antialias_widths_follow_each_axis_spacing(spacing, widths):
    assert C.antialias_widths(_series_affine(spacing)) == widths


def test_antialiased_resampling_keeps_the_signal_and_cuts_the_noise():
    """Point-sampling 1 mm noise at 3 mm keeps its full SD; averaging first divides it by about 3
    (a 3 x 3 in-plane box), while a uniform region keeps its value and a 12 mm bright block its contrast."""
    rng = np.random.default_rng(0)
    shape = (40, 216, 180)  # 160 x 216 x 180 mm at 4 x 1 x 1 mm: the study grid's field of view
    base = np.full(shape, 0.5, np.float32)
    base[18:21, 100:112, 84:96] = 0.9  # a 12 x 12 x 12 mm block
    noisy = (base + rng.normal(0, 0.1, shape)).astype(np.float32)
    aff = _series_affine(origin=(-90.0 + 0.5, -108.0 + 0.5, -80.0 + 2.0))
    centre = np.zeros(3)
    plain = C._resample(noisy[None], aff, centre)[0]
    smooth = C._resample(noisy[None], aff, centre, antialias=True)[0]
    clean = C._resample(base[None], aff, centre, antialias=True)[0]
    inner = (slice(5, 15), slice(10, 30), slice(10, 30))  # uniform background, away from edges
    sd_plain = (plain[inner] - 0.5).std()
    sd_smooth = (smooth[inner] - 0.5).std()
    assert 0.09 < sd_plain < 0.11
    assert 2.5 < sd_plain / sd_smooth < 3.5
    assert abs(smooth[inner].mean() - 0.5) < 0.01 and abs(clean[inner].mean() - 0.5) < 1e-5
    assert clean.max() > 0.85  # the block survives the averaging


@pytest.mark.parametrize("inplane, shape", [(3.0, (40, 72, 60)), (2.0, (40, 108, 90)), (1.5, (40, 144, 120))])
def test_study_grid_keeps_the_field_of_view(inplane, shape):
    """Every spacing covers the same 160 x 216 x 180 mm around the head; 3 mm is the records' grid."""
    g = C.StudyGrid.of(inplane)
    assert g.shape == shape and g.mm == (4.0, inplane, inplane)
    assert np.allclose(np.array(g.shape) * np.array(g.mm), C.FIELD_MM)
    assert C.StudyGrid.of() == C.DEFAULT_GRID and (C.GRID, C.GRID_MM) == ((40, 72, 60), (4.0, 3.0, 3.0))
    assert C.CNNConfig(inplane_mm=inplane).grid == g


@pytest.mark.parametrize("bad", [0.5, 7.0])
def test_study_grid_spacing_is_validated(bad):
    with pytest.raises(ValueError, match="in-plane spacing"):
        C.CNNConfig(inplane_mm=bad)


@pytest.mark.parametrize("inplane", [3.0, 2.0])
def test_mid_level_shape_is_what_the_network_makes(inplane):
    """The voxel head's class balance pools the masks to ``mid_shape``: it must be the shape the
    network's mid level really has on that grid."""
    grid = C.StudyGrid.of(inplane)
    net = C.StudyCNN(2, 3, n_aux=2).eval()
    with torch.no_grad():
        logits, seg = net(torch.zeros((1, 2) + grid.shape), torch.zeros(1))
    assert logits.shape == (1, 3) and tuple(seg.shape[2:]) == C.mid_shape(grid)


def test_a_block_lands_at_the_same_millimetres_on_either_grid():
    """Resampling is in millimetres: a 12 mm block about 30 mm right and 20 mm anterior of the
    centre sits where it is on the 3 mm and on the 2 mm grid."""
    shape = (40, 216, 180)  # 4 x 1 x 1 mm
    vol = np.zeros(shape, np.float32)
    aff = _series_affine(origin=(-90.0 + 0.5, -108.0 + 0.5, -80.0 + 2.0))
    inv = np.linalg.inv(aff)
    i, j, k = np.rint(inv[:3, :3] @ np.array([30.0, 20.0, 0.0]) + inv[:3, 3]).astype(int)
    vol[i - 1:i + 2, j - 6:j + 6, k - 6:k + 6] = 1.0
    where = aff[:3, :3] @ np.array([i, j - 0.5, k - 0.5]) + aff[:3, 3]  # the block's centre, RAS mm
    for inplane in (3.0, 2.0):
        grid = C.StudyGrid.of(inplane)
        out = C._resample(vol[None], aff, np.zeros(3), antialias=True, grid=grid)
        assert out.shape == (1,) + grid.shape
        np.testing.assert_allclose(_centre_mm(torch.from_numpy(out[None]), grid), where, atol=1.0)


def test_volumes_on_another_grid_are_refused():
    train, val, vols, y, age = _world(n_train=4, n_val=2)
    with pytest.raises(ValueError, match="2 mm grid"):
        C.train_cnn(vols, age, y, train, val, val, C.CNNConfig(epochs=1, batch=2, threads=1, inplane_mm=2.0))


def test_mask_supervised_training_on_the_finer_grid():
    """The voxel head trains on the 2 mm grid: masks at that grid, pooled to its own mid level."""
    grid = C.StudyGrid.of(2.0)
    rng = np.random.default_rng(0)
    keys = [f"s{i}" for i in range(6)]
    vols = {k: rng.random((1,) + grid.shape).astype(np.float16) for k in keys}
    masks = {k: np.zeros(grid.shape, np.uint8) for k in keys}
    for i, k in enumerate(keys):
        masks[k][18:22, 50:56, 40:46] = i % 2
    y = {k: np.array([i % 2, (i // 2) % 2], np.float32) for i, k in enumerate(keys)}
    age = {k: 50.0 for k in keys}
    cfg = C.CNNConfig(epochs=1, batch=2, threads=1, aux_weight=1.0, inplane_mm=2.0)
    res = C.train_cnn(vols, age, y, keys[:4], keys[4:], keys, cfg, masks=masks, n_aux=1)
    assert set(res.logits) == set(keys) and res.voxel_max[keys[0]].shape == (1,)
    assert all(np.isfinite(h["train_loss"]) for h in res.history)


def test_seg_to_head_reads_each_voxel_classs_peak():
    """With ``seg_to_head`` the study logits move by exactly the head's weight on a voxel class when
    that class's map is raised everywhere by 1 (its maximum rises by 1); without it they do not move."""
    torch.manual_seed(0)
    x, age = torch.rand((2, 2) + C.GRID), torch.zeros(2)
    for linked in (True, False):
        net = C.StudyCNN(2, 3, n_aux=2, seg_to_head=linked).eval()
        assert net.head.in_features == 3 * 128 + 1 + (2 if linked else 0)
        with torch.no_grad():
            before, seg0 = net(x, age)
            net.seg.bias[1] += 1.0
            after, seg1 = net(x, age)
        torch.testing.assert_close(seg1[:, 1], seg0[:, 1] + 1.0)
        expected = before + (net.head.weight[:, -1][None] if linked else 0.0)
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_seg_to_head_leaves_the_voxel_head_to_the_masks():
    """The study loss does not train the voxel head (the peaks are detached): its gradient from a
    classification loss alone is zero, while the head's weights on the peaks do get a gradient."""
    torch.manual_seed(0)
    net = C.StudyCNN(2, 3, n_aux=2, seg_to_head=True)
    logits, _ = net(torch.rand((2, 2) + C.GRID), torch.zeros(2))
    F = torch.nn.functional
    F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert net.seg.weight.grad is None or float(net.seg.weight.grad.abs().max()) == 0.0
    assert float(net.head.weight.grad[:, -2:].abs().max()) > 0


def test_seg_to_head_needs_the_mask_supervised_voxel_head():
    with pytest.raises(ValueError, match="needs aux_weight > 0"):
        C.CNNConfig(seg_to_head=True)
    with pytest.raises(ValueError, match="n_aux >= 1"):
        C.StudyCNN(2, 3, n_aux=0, seg_to_head=True)
    train, val, vols, y, age = _world(n_train=4, n_val=2)
    with pytest.raises(ValueError, match="needs lesion masks"):
        C.train_cnn(vols, age, y, train, val, val, C.CNNConfig(epochs=1, batch=2, threads=1, aux_weight=1.0,
                                                               seg_to_head=True))
