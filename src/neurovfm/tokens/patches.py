"""Foreground masks and 4 x 16 x 16 tokens with integer grid coordinates.

A voxel is background if CT HU <= -500 or MRI intensity <= the volume's 10th percentile;
a token is background if any of its voxels is (the reference rule), and background tokens
are dropped. Each kept token carries its (d, h, w) grid index; the grid affine maps a
token index to the scanner position of the token's centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurovfm.ingest.geometry import CanonicalVolume
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.tokens.windows import hu_to_fixed, mr_to_uint8, window_to_uint8


def patchify(arr: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """[D, H, W] -> [nd*nh*nw, pd*ph*pw], patches in (d, h, w) order, voxels in (d, h, w) order."""
    D, H, W = arr.shape
    pd, ph, pw = patch
    if D % pd or H % ph or W % pw:
        raise ValueError(f"shape {arr.shape} is not a multiple of the patch {patch}")
    x = arr.reshape(D // pd, pd, H // ph, ph, W // pw, pw)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, pd * ph * pw)


def unpatchify(tokens: np.ndarray, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`patchify` for a full grid."""
    nd, nh, nw = grid
    pd, ph, pw = patch
    x = tokens.reshape(nd, nh, nw, pd, ph, pw).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(nd * pd, nh * ph, nw * pw)


def token_foreground(fg: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """Boolean grid [nd, nh, nw]: True where every voxel of the token is foreground."""
    D, H, W = fg.shape
    pd, ph, pw = patch
    x = fg.reshape(D // pd, pd, H // ph, ph, W // pw, pw)
    return x.all(axis=(1, 3, 5))


def token_grid_affine(voxel_affine: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """Affine from token index (d, h, w) to the RAS position of the token's centre."""
    s = np.eye(4)
    for a in range(3):
        s[a, a] = patch[a]
        s[a, 3] = (patch[a] - 1) / 2.0
    return voxel_affine @ s


@dataclass
class TokenizedSeries:
    """Foreground tokens of one series, ready for the cache.

    ``tokens``: [n, V, prod(patch)], uint8 views (MR, or CT stored as windows) or int16
    fixed-point HU (CT ``hu16``, V = 1). ``coords``: [n, 3] int16 grid indices (d, h, w).
    """

    tokens: np.ndarray
    coords: np.ndarray
    storage: str  # "u8" (views) or "hu16"
    views: tuple[str, ...]
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    voxel_affine: np.ndarray
    volume_shape: tuple[int, int, int]

    @property
    def n_tokens(self) -> int:
        return int(self.coords.shape[0])


def tokenize(cv: CanonicalVolume, modality: str, policy: PreprocessPolicy) -> TokenizedSeries:
    """Canonical volume -> foreground tokens in the policy's storage form."""
    vol = cv.data
    patch = policy.patch
    grid = tuple(s // p for s, p in zip(vol.shape, patch))
    if modality == "CT":
        fg = vol > policy.ct_background_hu
        if policy.ct_storage == "hu16":
            stacks = [hu_to_fixed(vol, policy.hu16_scale)]
            storage, views = "hu16", ("hu",)
        else:
            stacks = [window_to_uint8(vol, w) for w in policy.ct_windows]
            storage, views = "u8", tuple(w.name for w in policy.ct_windows)
    elif modality == "MR":
        lo_pct, hi_pct = policy.mr_clip_percentiles
        thr, lo, hi = np.percentile(vol, [policy.mr_background_percentile, lo_pct, hi_pct])  # one selection pass
        fg = vol > thr
        stacks = [mr_to_uint8(vol, lo_pct, hi_pct, bounds=(float(lo), float(hi)))]
        storage, views = "u8", ("mr",)
    else:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    keep = token_foreground(fg, patch).reshape(-1)
    idx = np.flatnonzero(keep)
    toks = np.stack([patchify(s, patch)[idx] for s in stacks], axis=1)
    nd, nh, nw = grid
    coords = np.stack(np.unravel_index(idx, (nd, nh, nw)), axis=1).astype(np.int16)
    return TokenizedSeries(
        tokens=np.ascontiguousarray(toks),
        coords=coords,
        storage=storage,
        views=views,
        grid_shape=grid,
        grid_affine=token_grid_affine(cv.affine, patch),
        voxel_affine=cv.affine,
        volume_shape=tuple(vol.shape),
    )
