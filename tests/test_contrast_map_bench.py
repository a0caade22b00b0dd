"""bench/explain/contrast_map_val.py: the class-discriminative map and its dump, by hand."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "contrast_map_val", os.path.join(os.path.dirname(__file__), "..", "bench", "explain", "contrast_map_val.py"))
cm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cm)


def test_contrast_subtracts_the_strongest_rival_only():
    z = np.array([[3.0, 1.0, 2.5], [1.0, 0.0, -1.0]])
    rivals = np.array([[False, True, True],  # label 0 competes with 1 and 2
                       [False, False, False],  # label 1 has no rival: unchanged
                       [False, True, False]])  # label 2 competes with 1 only (shares lesions with 0)
    got = cm.contrast(z, rivals)
    np.testing.assert_allclose(got, [[3.0 - 2.5, 1.0, 2.5 - 1.0], [1.0 - 0.0, 0.0, -1.0 - 0.0]])


def test_score_counts_per_lesion_trials_of_each_map():
    # one study, 4 tokens, two lesions (mask 1: label x on token 0; mask 2: label y on token 3)
    ov = np.zeros((4, 3), bool)
    ov[0, 1] = ov[3, 2] = True
    head = np.array([[0.7, 0.1], [0.1, 0.1], [0.1, 0.1], [0.1, 0.7]])  # head map hits both
    logits = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 5.0]])  # x's logit peaks off its lesion
    st = {"modality": "CT", "labels": ["x", "y"], "ov": ov,
          "findings": [{"label": "x", "mask_index": 1, "size_mm": 20, "side": "left"},
                       {"label": "y", "mask_index": 2, "size_mm": 20, "side": "right"},
                       {"label": "y", "mask_index": 2, "size_mm": 5, "side": "right"}],  # too small: no trial
             "series": [{"head": head, "views": [logits]}]}
    rivals = {"CT": np.array([[False, True], [True, False]])}
    res = cm.score([st], rivals)
    assert res["CT"]["n_lesions"] == 2 and res["CT"]["head"] == 1.0 and res["CT"]["token"] == 0.5
    # contrast for x: x - y = [0, 2, 0, -5] -> peak on token 1 (miss); for y: y - x = [0, -2, 0, 5] -> hit
    assert res["CT"]["contrast"] == 0.5


def test_dump_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    st = {"patient": 3, "modality": "MR", "labels": ["x"], "findings": [{"label": "x", "mask_index": 1}],
          "ov": rng.random((5, 2)) > 0.5,
          "series": [{"head": rng.random((3, 1)), "views": [rng.normal(size=(3, 1))]},
                     {"head": rng.random((2, 1)), "views": [rng.normal(size=(2, 1)), rng.normal(size=(2, 1))]}]}
    path = str(tmp_path / "d.npz")
    cm.save_dump(path, [st])
    (back,) = cm.load_dump(path)
    assert back["patient"] == 3 and back["findings"] == st["findings"]
    np.testing.assert_array_equal(back["ov"], st["ov"])
    for a, b in zip(back["series"], st["series"]):
        np.testing.assert_array_equal(a["head"], b["head"])
        assert len(a["views"]) == len(b["views"]) and all(np.array_equal(x, y) for x, y in zip(a["views"], b["views"]))
