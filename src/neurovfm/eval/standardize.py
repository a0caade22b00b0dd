"""Per-dimension standardisation for the linear probes (anatomy, shortcut), in numpy float64.

The probes fit on a fixed token or study sample in one go, so the statistics are plain column
means and standard deviations; a constant column keeps scale 1 rather than dividing by ~0.
(Study heads use ``probe.heads.FeatureStandardizer`` instead: streamed, saved with the head, and
floored relative to the RMS spread for float16 features.)"""

from __future__ import annotations

import numpy as np

MIN_SPREAD = 1e-8  # a column with less spread than this is constant: scale 1


def fit_standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per column of ``x`` [n, d]."""
    x = np.asarray(x)
    sd = x.std(0)
    return x.mean(0), np.where(sd > MIN_SPREAD, sd, 1.0)


def standardize(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(x) - mean) / scale
