"""Distance to the training data (analyze's out-of-distribution warning)."""

from __future__ import annotations

import numpy as np
import pytest

from neurovfm.analyze.ood import fit_ood, load_ood, save_ood
from neurovfm.models.folder import FORMAT, FORMAT_VERSION, write_json


@pytest.mark.parametrize("n_train", [5, 200])  # few studies: training points span their own subspace
def test_threshold_flags_shifted_studies_not_held_out_ones(n_train, tmp_path):
    rng = np.random.default_rng(n_train)
    dim = 32
    basis = rng.normal(size=(dim, dim))
    draw = lambda n, shift=0.0: rng.normal(size=(n, dim)) @ basis + shift  # noqa: E731
    m = fit_ood(draw(n_train), draw(max(4, n_train // 3)), k=16, quantile=0.95)
    held_out = m.score(draw(400))
    shifted = m.score(draw(50, shift=40.0 * basis.std()))  # far outside the training cloud
    assert np.mean(held_out > m.threshold) < 0.2  # about 1 - quantile, plus noise for tiny fits
    assert np.all(shifted > m.threshold)
    write_json(str(tmp_path / "config.json"), {"format": FORMAT, "format_version": FORMAT_VERSION})
    save_ood(str(tmp_path), "CT", m)
    back = load_ood(str(tmp_path), "CT")
    assert back is not None and load_ood(str(tmp_path), "MR") is None
    x = draw(3)
    np.testing.assert_allclose(back.score(x), m.score(x), rtol=1e-4)
