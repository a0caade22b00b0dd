"""Grounding-map geometry: a lesion on the patient's left stays on the left after ingest, the
token grid, and the projection back onto the original series, whatever the acquisition plane,
voxel order or head position; the side is judged against the head's own mid-sagittal plane."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from analyze_support import head_volume, reorient, write_nifti_study
from neurovfm.analyze.config import AnalyzeConfig
from neurovfm.analyze.pipeline import read_study
from neurovfm.explain import maps as M

CENTRE = np.array([30.0, -12.0, 18.0])  # an off-centre head: scanner x = 0 is 30 mm to its right... of its left
LESION_OFFSET = {"left": np.array([-35.0, 10.0, 5.0]), "right": np.array([35.0, 10.0, 5.0])}


def _yaw(aff: np.ndarray, deg: float) -> np.ndarray:
    """Turn the head about the scanner's z axis through its centre (a patient lying rotated)."""
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    move = np.eye(4)
    move[:3, 3] = CENTRE
    back = np.eye(4)
    back[:3, 3] = -CENTRE
    return move @ r @ back @ aff


# thick slices along the acquisition's slice axis (x sagittal, y coronal, z axial), fine in-plane
GRIDS = {"axial": ((128, 140, 34), (1.5, 1.5, 5.0)), "coronal": ((128, 42, 114), (1.5, 5.0, 1.5)),
         "sagittal": ((40, 140, 114), (5.0, 1.5, 1.5))}


def _series(tmp_path, plane: str, side: str, yaw: float = 0.0):
    shape, spacing = GRIDS[plane]
    vol, aff = head_volume(shape=shape, spacing=spacing, centre_mm=tuple(CENTRE), lesion_side=side, modality="MR")
    if yaw:
        aff = _yaw(aff, yaw)
    v, a = reorient(vol, aff, "axial")  # keeps the slice axis last, flips the first stored axis
    write_nifti_study(str(tmp_path / "study"), v, a, "MR")
    series, warnings = read_study(str(tmp_path / "study"), AnalyzeConfig())
    assert len(series) == 1 and not warnings
    return series[0], v


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_lesion_side_survives_tokens_and_projection(tmp_path, plane, side):
    s, native = _series(tmp_path, plane, side)
    assert s.meta["plane"] == plane
    geom = s.source.geometry
    # a per-token score computed from the tokens themselves: share of lesion-dark voxels
    score = (s.ts.tokens[:, 0] < 100).mean(1)
    assert score.max() > 0.5
    grid = M.dense_grid(s.ts.coords, score / score.max(), s.ts.grid_shape)
    heat = M.project_to_native(grid, s.ts.grid_affine, geom)
    path = M.save_nifti(str(tmp_path / "map.nii.gz"), heat, geom.affine(), kind="map")
    img = nib.load(path)
    assert img.shape == native.shape
    data = img.get_fdata()
    assert 0.7 <= data.max() <= 1.0 + 1e-6
    ijk = np.argwhere(data > 0.5 * data.max())
    com = nib.affines.apply_affine(img.affine, ijk).mean(0)
    truth = CENTRE + LESION_OFFSET[side]
    assert np.linalg.norm(com - truth) < 10.0, (com, truth)
    # side relative to the head's own mid-sagittal plane (the head is 30 mm off scanner x = 0)
    thr = M.otsu_threshold(native) * 0.5
    plane_fit = M.estimate_midplane(M.head_points_ras(native, geom, thr))
    assert abs(plane_fit.distance(CENTRE[None])[0]) < 3.0
    assert 120 < plane_fit.width_mm < 170
    got, shares = M.side_of_mass(score, M.token_centres_ras(s.ts.grid_affine, s.ts.coords), plane_fit)
    assert got == side, shares


def test_side_uses_the_head_not_the_scanner(tmp_path):
    """A head turned 20 degrees: the mid-sagittal plane turns with it; a lesion on the left stays left."""
    s, native = _series(tmp_path, "axial", "left", yaw=20.0)
    thr = M.otsu_threshold(native) * 0.5
    plane_fit = M.estimate_midplane(M.head_points_ras(native, s.source.geometry, thr))
    assert plane_fit.b == pytest.approx(-np.tan(np.deg2rad(20.0)), abs=0.06)  # turned with the head
    assert abs(plane_fit.distance(CENTRE[None])[0]) < 4.0
    score = (s.ts.tokens[:, 0] < 100).mean(1)
    got, _ = M.side_of_mass(score, M.token_centres_ras(s.ts.grid_affine, s.ts.coords), plane_fit)
    assert got == "left"


def test_side_rule_cutoffs():
    plane = M.MidPlane(a=10.0)
    pts = np.array([[-20.0, 0, 0], [40.0, 0, 0], [12.0, 0, 0]])
    assert M.side_of_mass([1, 0, 0], pts, plane)[0] == "left"  # x = -20 is left of a plane at x = 10
    assert M.side_of_mass([0, 1, 0], pts, plane)[0] == "right"
    assert M.side_of_mass([0, 0, 1], pts, plane)[0] == "midline"  # 2 mm from the plane
    assert M.side_of_mass([1, 1, 0], pts, plane)[0] == "bilateral"
    assert M.side_of_mass([0.75, 0.25, 0], pts, plane)[0] == "left"  # 75 % >= the 70 % cut-off
    assert M.side_of_mass([0.6, 0.4, 0], pts, plane)[0] == "bilateral"
    assert M.side_of_mass([0, 0, 0], pts, plane)[0] == "unknown"


def test_projection_inverts_the_grid_affine():
    """Token centres land exactly on their token's value; halfway between two tokens, the mean."""
    from neurovfm.ingest.geometry import StackGeometry

    grid_aff = np.array([[0, 0, -16.0, 100], [0, 16.0, 0, -50], [4.0, 0, 0, -30], [0, 0, 0, 1]])
    g = np.zeros((3, 4, 5), np.float32)
    g[1, 2, 3] = 1.0
    centre = grid_aff @ np.array([1, 2, 3, 1.0])
    mid = grid_aff @ np.array([1, 2, 3.5, 1.0])
    geom = StackGeometry(shape=(2, 1, 1), spacing_ij=(1.0, 1.0), dir_i=(mid[:3] - centre[:3]) / np.linalg.norm(mid[:3] - centre[:3]),
                         dir_j=(0, 1.0, 0), normal=(0, 0, 1.0), origin=centre[:3], positions=[0.0])
    geom.spacing_ij = (float(np.linalg.norm(mid[:3] - centre[:3])), 1.0)
    out = M.project_to_native(g, grid_aff, geom)
    assert out[0, 0, 0] == pytest.approx(1.0, abs=1e-5)
    assert out[1, 0, 0] == pytest.approx(0.5, abs=1e-5)


def test_saved_affine_keeps_gantry_tilt():
    """A tilted stack: the saved affine puts every voxel where the true geometry does."""
    from neurovfm.ingest.geometry import StackGeometry

    n = 12
    step, tilt = 5.0, np.deg2rad(12.0)
    geom = StackGeometry(shape=(8, 9, n), spacing_ij=(0.5, 0.5), dir_i=(-1.0, 0, 0), dir_j=(0, -1.0, 0),
                         normal=(0, 0, 1.0), origin=(10.0, 20.0, -30.0), positions=np.arange(n) * step,
                         shifts=np.column_stack([np.zeros(n), np.arange(n) * step * np.tan(tilt)]))
    assert geom.is_tilted
    aff = M.native_affine(geom)
    for k in (0, 5, n - 1):
        truth = M.native_plane_ras(geom, k)
        ijk = np.stack(np.meshgrid(np.arange(8), np.arange(9), [k], indexing="ij"), -1).reshape(-1, 3)
        got = nib.affines.apply_affine(aff, ijk).reshape(8, 9, 3)
        assert np.allclose(got, truth[:, :, :], atol=1e-6)
    assert not np.allclose(geom.affine(), aff)  # the nominal affine would be off by the tilt


def test_token_lesion_overlap_finds_the_lesion_tokens(tmp_path):
    """Tokens the pointing game counts as 'on the lesion' are the ones that hold lesion voxels."""
    from neurovfm.explain.pointing import token_lesion_overlap

    s, native = _series(tmp_path, "coronal", "right")
    les = native < 200  # the dark lesion (scalp 300, brain 500, air outside the head)
    head = native > 100
    mask = (les & head).astype(np.int16) * 3  # lesion index 3, as in an archive's masks
    img = nib.Nifti1Image(mask, M.native_affine(s.source.geometry))
    ov = token_lesion_overlap(s.ts, img)
    assert ov.shape == (s.ts.n_tokens, 4)
    on = ov[:, 3]
    dist = np.linalg.norm(M.token_centres_ras(s.ts.grid_affine, s.ts.coords) - (CENTRE + LESION_OFFSET["right"]), axis=1)
    reach = 14.0 + np.sqrt(8.0 ** 2 + 8.0 ** 2 + 2.0 ** 2)  # lesion radius + a token's half-diagonal
    assert on.sum() >= 3
    assert np.all(dist[on] < reach + 2.5)  # every 'on' token can hold lesion voxels
    assert np.all(on[dist < 8.0])  # tokens centred in the lesion are 'on'
    assert not ov[:, 1:3].any()  # no other label invented


def test_attention_rollout_keeps_mass_and_spreads_it():
    """Rollout rows sum to one, so every class keeps its total mass; with attention mixing tokens,
    a map that sat on one output token spreads to the input tokens that fed it."""
    import torch

    from neurovfm.explain.rollout import rollout_attention, rollout_matrix
    from neurovfm.models.config import encoder_config
    from neurovfm.models.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(encoder_config("tiny", width=48, depth=2, heads=2)).eval()
    rng = np.random.default_rng(0)
    views = [(rng.integers(0, 255, (n, 1024), dtype=np.uint8), rng.integers(0, 6, (n, 3)), "mr") for n in (7, 5)]
    r = rollout_matrix(enc, *views[0])
    assert r.shape == (7, 7) and np.allclose(r.sum(1), 1.0)
    attn = np.zeros((12, 2))
    attn[3, 0] = 1.0  # class 0: all mass on output token 3 of view 0
    attn[7:, 1] = 0.2  # class 1: uniform over view 1
    out = rollout_attention(enc, views, attn)
    assert np.allclose(out.sum(0), attn.sum(0))
    assert np.allclose(out[7:, 0], 0) and np.allclose(out[:7, 1], 0)  # mass never crosses series views
    assert (out[:7, 0] > 0).sum() > 1  # spread over the inputs of token 3


def test_pointing_hit_counts_tied_top_tokens_by_their_share_in_the_lesion():
    """A top-k head's map is flat over the tokens it picked: the hit is the share of the tied top
    tokens inside the lesion, the same whatever order the tokens come in."""
    from neurovfm.explain.pointing import pointing_hit

    rng = np.random.default_rng(0)
    inside = np.zeros(50, bool)
    inside[[3, 17]] = True
    w = rng.random(50) * 0.1
    w[17] = 0.5  # one clear peak, in the lesion
    assert pointing_hit(w, inside) == 1.0
    w[17] = 0.05
    w[[3, 20, 30, 40]] = 0.25  # four tied tokens, one of them in the lesion
    w[20] += 1e-12  # a sum over views that differs in the last bits still ties
    assert pointing_hit(w, inside) == pytest.approx(0.25)
    for _ in range(5):
        perm = rng.permutation(50)
        assert pointing_hit(w[perm], inside[perm]) == pytest.approx(0.25)
    assert pointing_hit(np.zeros(50), inside) == 0.0  # no positive evidence points at nothing
    assert pointing_hit(np.r_[np.zeros(49), 1.0], inside) == 0.0


def test_pointing_summary_resamples_patients_not_findings():
    """The hit-rate interval comes from a patient bootstrap: a sure hit is an interval of width
    zero, and findings that cluster in few patients (hits shared within a patient) give a wider
    interval than the same findings from as many patients."""
    from neurovfm.explain.pointing import PointingConfig, summarize

    cfg = PointingConfig()

    def rows(hits, patients):
        return [{"hit": h, "uniform_hit": 0.1, "mass_inside": 0.2, "patient": p, "modality": "CT",
                 "label": "epidural_hematoma"} for h, p in zip(hits, patients)]

    sure = summarize(rows([True] * 8, [f"p{i}" for i in range(8)]), cfg)
    assert sure["hit_minus_uniform_ci95"] == pytest.approx([0.9, 0.9])
    hits = [i % 10 < 4 for i in range(60)]  # 24 of 60 hit; in the clustered case, 4 of 10 patients hit everything
    spread = summarize(rows(hits, [f"p{i}" for i in range(60)]), cfg)
    clustered = summarize(rows(hits, [f"p{i % 10}" for i in range(60)]), cfg)
    assert spread["hit_rate"] == clustered["hit_rate"] == pytest.approx(0.4)
    assert (spread["n_patients"], clustered["n_patients"]) == (60, 10)
    for s in (spread, clustered):
        lo, hi = s["hit_minus_uniform_ci95"]
        assert lo < 0.3 < hi
    width = [s["hit_minus_uniform_ci95"][1] - s["hit_minus_uniform_ci95"][0] for s in (spread, clustered)]
    assert width[1] > 1.8 * width[0]
    assert clustered["by_label"]["CT:epidural_hematoma"] == {"n": 60, "hit_rate": pytest.approx(0.4)}
    # per modality: each modality's own findings, patients and rates
    mixed = rows(hits, [f"p{i % 10}" for i in range(60)])
    for i, r in enumerate(mixed):
        if i % 3 == 0:
            r.update(modality="MR", uniform_hit=0.3, mass_inside=0.5)
    bm = summarize(mixed, cfg)["by_modality"]
    mr = [i for i in range(60) if i % 3 == 0]
    ct = [i for i in range(60) if i % 3]
    assert set(bm) == {"CT", "MR"}
    assert bm["MR"] == {"n_findings": 20, "n_patients": len({i % 10 for i in mr}),
                        "hit_rate": pytest.approx(np.mean([hits[i] for i in mr])),
                        "uniform_hit_rate": pytest.approx(0.3),
                        "mass_inside_lesion": pytest.approx(0.5)}
    assert bm["CT"]["n_findings"] == 40 and bm["CT"]["hit_rate"] == pytest.approx(np.mean([hits[i] for i in ct]))
    assert bm["CT"]["uniform_hit_rate"] == pytest.approx(0.1)


def test_pointing_trials_pool_the_lesions_of_a_label_in_a_study():
    """One trial per (study, label): a hit on any lesion of that label counts (two gliomas, one
    map); smaller lesions of the label count as hits too but make no trial of their own; labels
    the head does not score, and lesions no token overlaps, make none. Per lesion: one trial each."""
    from neurovfm.explain.pointing import pointing_trials

    ov = np.zeros((6, 5), bool)  # 6 tokens, mask values 0..4
    ov[0, 1] = ov[1, 2] = ov[2, 3] = True  # lesions 1, 2, 3 each touch one token; lesion 4 touches none
    f = [{"label": "glioma", "mask_index": 1, "size_mm": 30.0, "side": "left"},
         {"label": "glioma", "mask_index": 2, "size_mm": 12.0, "side": "right"},
         {"label": "glioma", "mask_index": 3, "size_mm": 6.0, "side": "right"},
         {"label": "edema", "mask_index": 3, "size_mm": 6.0, "side": "right"},  # too small for a trial
         {"label": "stroke", "mask_index": 4, "size_mm": 20.0, "side": "left"},  # outside every token
         {"label": "unscored", "mask_index": 1, "size_mm": 30.0, "side": "left"}]
    labels = ["glioma", "edema", "stroke"]
    (t,) = pointing_trials(f, ov, labels, 10.0)
    assert t["label"] == "glioma" and t["n_lesions"] == 3 and t["size_mm"] == 30.0 and t["side"] == "left+right"
    assert t["inside"].tolist() == [True, True, True, False, False, False]
    sep = pointing_trials(f, ov, labels, 10.0, pool_same_label=False)
    assert [(x["label"], x["size_mm"], x["side"], x["n_lesions"]) for x in sep] == [("glioma", 30.0, "left", 1),
                                                                                     ("glioma", 12.0, "right", 1)]
    assert [x["inside"].nonzero()[0].tolist() for x in sep] == [[0], [1]]
    assert pointing_trials(f, ov, labels, 40.0) == []


def test_pointing_cli_trials_default_to_study_labels_and_per_lesion_on_request(monkeypatch, capsys, tmp_path):
    import neurovfm.explain.pointing as pointing_mod
    from neurovfm.cli import main as cli_main

    seen = []

    def fake(archive, model, out, cfg, progress=True):
        seen.append(cfg.pool_same_label)
        sm = {"n_findings": 3, "n_patients": 2, "hit_rate": 0.5, "uniform_hit_rate": 0.1,
              "hit_minus_uniform_ci95": [0.1, 0.6], "mass_inside_lesion": 0.3, "uniform_mass_inside_lesion": 0.1,
              "by_modality": {"CT": {"hit_rate": 0.5, "n_findings": 2, "n_patients": 1, "uniform_hit_rate": 0.1},
                              "MR": {"hit_rate": 0.5, "n_findings": 1, "n_patients": 1, "uniform_hit_rate": 0.1}}}
        return {"summary": sm, "by_map_source": {"head": sm}}

    monkeypatch.setattr(pointing_mod, "run_pointing", fake)
    assert cli_main(["pointing", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    pooled = capsys.readouterr().out
    assert cli_main(["pointing", str(tmp_path), "--out", str(tmp_path / "o"), "--per-lesion"]) == 0
    per = capsys.readouterr().out
    assert seen == [True, False]
    assert "3 study labels with a lesion >= 10 mm" in pooled and "CT: hit rate 0.500 (2 study labels" in pooled
    assert "3 lesions >= 10 mm" in per and "(2 lesions," in per
