"""Intensity views: CT windows from Hounsfield units, MRI percentile scaling, all to uint8.

CT can be stored as one fixed-point HU view (int16, ``policy.hu16_scale`` steps per HU) and
windowed at read time through a 64 K lookup table, or as three stored uint8 windows; both
give the same uint8 values up to one level (see README, "Cache format").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from neurovfm.ingest.policy import PreprocessPolicy, Window


def window_to_uint8(hu: np.ndarray, window: Window) -> np.ndarray:
    """Clip to the window, scale to [0, 1], round to 0..255."""
    x = (np.asarray(hu, np.float32) - np.float32(window.lower)) * np.float32(255.0 / window.width)
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)


def hu_to_fixed(hu: np.ndarray, scale: float) -> np.ndarray:
    """HU -> int16 fixed point (``scale`` steps per HU), saturating at the int16 range."""
    x = np.rint(np.asarray(hu, np.float32) * np.float32(scale))
    return np.clip(x, -32768, 32767).astype(np.int16)


@lru_cache(maxsize=16)
def _fixed_lut(lower: float, width: float, scale: float) -> np.ndarray:
    codes = np.arange(65536, dtype=np.int64) - 32768
    hu = codes.astype(np.float64) / scale
    x = (hu - lower) * (255.0 / width)
    lut = np.rint(np.clip(x, 0, 255)).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def fixed_to_window(fixed: np.ndarray, window: Window, scale: float) -> np.ndarray:
    """uint8 window of int16 fixed-point HU via a lookup table (no float pass)."""
    lut = _fixed_lut(float(window.lower), float(window.width), float(scale))
    idx = np.asarray(fixed, np.int16).view(np.uint16) ^ np.uint16(0x8000)
    return lut[idx]


def mr_to_uint8(vol: np.ndarray, lo_pct: float, hi_pct: float,
                bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Clip an MR volume to its [lo, hi] percentiles (or given ``bounds``) and scale to 0..255."""
    v = np.asarray(vol, np.float32)
    lo, hi = bounds if bounds is not None else np.percentile(v, [lo_pct, hi_pct])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(v.shape, np.uint8)
    x = (np.clip(v, lo, hi) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(x).astype(np.uint8)


def ct_view_names(policy: PreprocessPolicy) -> tuple[str, ...]:
    return tuple(w.name for w in policy.ct_windows)
