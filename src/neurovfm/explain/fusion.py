"""A study's map fused across its co-registered series.

An MRI study holds one series per sequence (T1, T2, FLAIR, DWI, ...), all of the same head; a
lesion shows on several of them, while a spurious peak of a token classifier usually shows on one.
So a token's fused map value is a weighted mean of its own value and the mean value of the
co-located tokens of the study's other series (the nearest token centre in world millimetres, within
``probe.context.CROSS_SERIES_MM``: the same pairing the cross-series features use). Series that
share no space with the others (or a study of one series) keep their own map. Chosen on the
validation split per head (Plan Q: ``neurovfm pointing --split val --map-sources head,token,token-fused``).
"""

from __future__ import annotations

import numpy as np

from neurovfm.probe.context import CROSS_SERIES_MM, cross_series_mean

OWN_WEIGHT = 0.5  # a token's own value against the mean of its partners in the other series


def fuse_series_maps(per_series_w: list[np.ndarray], centres: list[np.ndarray], own: float = OWN_WEIGHT,
                     max_mm: float = CROSS_SERIES_MM) -> list[np.ndarray]:
    """Per series [n_tokens, C] map values -> the same shapes, each token ``own`` x its value +
    (1 - ``own``) x the mean over the OTHER series of their co-located token's value (``centres``:
    [n_tokens, 3] world mm per series). Values stay non-negative if they were; the caller
    renormalises if it needs a distribution."""
    if not 0.0 <= own <= 1.0:
        raise ValueError(f"own weight must be in [0, 1], not {own!r}")
    if len(per_series_w) != len(centres):
        raise ValueError(f"{len(per_series_w)} series maps but {len(centres)} centre arrays")
    w = [np.asarray(x, np.float64) for x in per_series_w]
    other = cross_series_mean([x.astype(np.float32) for x in w], centres, list(range(len(w))), max_mm)
    return [own * x + (1.0 - own) * o.astype(np.float64) for x, o in zip(w, other)]
