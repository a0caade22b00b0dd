"""Context / target masks for one series, from its foreground token coordinates.

``tube`` is the reference's scheme (SPEC.md section 2): one target tube through every slice
whose in-plane footprint covers about 70-75 % of the series' in-plane foreground (aspect
ratio 0.3-3); the context is the complement, thinned to about 20 % (CT) / 25 % (MRI) of the
foreground by removing one contiguous slab of slices, then 10 % of the context dropped at
random. Targets are every foreground token outside the final context (``targets="complement"``,
about 80 % predicted) or the tube alone (``targets="tube"``).

``multiblock`` is the alternative: a few random 3D boxes as targets (I-JEPA / V-JEPA style),
context = the rest, minus the same random drop.

Masks are drawn from a ``numpy.random.Generator`` the caller keys by (seed, epoch, series), so
they do not depend on batch composition, worker or rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskConfig:
    scheme: str = "tube"  # tube | multiblock
    tube_area: tuple[float, float] = (0.70, 0.75)  # share of in-plane foreground columns
    tube_aspect: tuple[float, float] = (0.3, 3.0)
    context_ratio_ct: float = 0.20
    context_ratio_mr: float = 0.25
    context_drop: float = 0.10
    targets: str = "complement"  # complement | tube
    blocks: int = 4
    block_scale: tuple[float, float] = (0.10, 0.20)  # share of the token grid's box per block
    min_tokens: int = 8  # smaller series are not used for pretraining

    def __post_init__(self) -> None:
        if self.scheme not in ("tube", "multiblock"):
            raise ValueError(f"mask scheme must be 'tube' or 'multiblock', got {self.scheme!r}")
        if self.targets not in ("complement", "tube"):
            raise ValueError(f"mask targets must be 'complement' or 'tube', got {self.targets!r}")
        lo, hi = self.tube_area
        if not 0 < lo <= hi < 1:
            raise ValueError(f"tube_area must satisfy 0 < lo <= hi < 1, got {self.tube_area}")
        for r in (self.context_ratio_ct, self.context_ratio_mr, self.context_drop):
            if not 0 <= r < 1:
                raise ValueError("context ratios and drop must lie in [0, 1)")
        if self.min_tokens < 2:
            raise ValueError("min_tokens must be at least 2 (one context and one target)")


def _rectangles(occ: np.ndarray, aspect: tuple[float, float]):
    """All axis-aligned rectangles of an occupancy grid: bounds and covered-cell counts."""
    H, W = occ.shape
    ps = np.zeros((H + 1, W + 1), np.int64)
    ps[1:, 1:] = occ.cumsum(0).cumsum(1)
    h0, h1, w0, w1 = np.meshgrid(np.arange(H), np.arange(1, H + 1), np.arange(W), np.arange(1, W + 1),
                                 indexing="ij")
    ok = (h1 > h0) & (w1 > w0)
    h0, h1, w0, w1 = h0[ok], h1[ok], w0[ok], w1[ok]
    ar = (h1 - h0) / (w1 - w0)
    keep = (ar >= aspect[0]) & (ar <= aspect[1])
    h0, h1, w0, w1 = h0[keep], h1[keep], w0[keep], w1[keep]
    cover = ps[h1, w1] - ps[h0, w1] - ps[h1, w0] + ps[h0, w0]
    return h0, h1, w0, w1, cover


def tube_target(coords: np.ndarray, cfg: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n]: tokens inside a full-depth in-plane rectangle covering the wanted area."""
    hw = coords[:, 1:] - coords[:, 1:].min(0)
    H, W = hw.max(0) + 1
    occ = np.zeros((H, W), np.int64)
    occ[hw[:, 0], hw[:, 1]] = 1
    total = occ.sum()
    h0, h1, w0, w1, cover = _rectangles(occ, cfg.tube_aspect)
    want = rng.uniform(*cfg.tube_area)
    frac = cover / total
    lo, hi = cfg.tube_area
    cand = np.flatnonzero((frac >= lo) & (frac <= hi))
    if cand.size == 0:  # small grids: the closest achievable coverage
        err = np.abs(frac - want)
        cand = np.flatnonzero(err <= err.min() + 1e-12)
    i = cand[rng.integers(cand.size)]
    return (hw[:, 0] >= h0[i]) & (hw[:, 0] < h1[i]) & (hw[:, 1] >= w0[i]) & (hw[:, 1] < w1[i])


def thin_by_slab(coords: np.ndarray, cand: np.ndarray, keep_n: int, rng: np.random.Generator) -> np.ndarray:
    """Remove one contiguous slab of slices from ``cand`` so about ``keep_n`` tokens remain."""
    if cand.sum() <= keep_n:
        return cand
    d = coords[:, 0] - coords[:, 0].min()
    D = int(d.max()) + 1
    per = np.bincount(d[cand], minlength=D)
    ps = np.concatenate(([0], per.cumsum()))
    total = ps[-1]
    a, b = np.meshgrid(np.arange(D), np.arange(1, D + 1), indexing="ij")
    ok = b > a
    a, b = a[ok], b[ok]
    remain = total - (ps[b] - ps[a])
    err = np.abs(remain - keep_n)
    best = np.flatnonzero(err <= max(err.min(), int(0.02 * total)))
    j = best[rng.integers(best.size)]
    return cand & ~((d >= a[j]) & (d < b[j]))


def multiblock_target(coords: np.ndarray, cfg: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    c = coords - coords.min(0)
    ext = c.max(0) + 1
    tgt = np.zeros(len(c), bool)
    for _ in range(cfg.blocks):
        vol = rng.uniform(*cfg.block_scale) * float(np.prod(ext))
        ar = np.exp(rng.uniform(np.log(cfg.tube_aspect[0]), np.log(cfg.tube_aspect[1]), size=2))
        side = np.cbrt(vol / (ar[0] * ar[1]))
        size = np.clip(np.round(np.array([side, side * ar[0], side * ar[1]])), 1, ext).astype(int)
        lo = np.array([rng.integers(0, e - s + 1) for e, s in zip(ext, size)])
        tgt |= np.all((c >= lo) & (c < lo + size), axis=1)
    return tgt


def make_mask(coords: np.ndarray, modality: str, cfg: MaskConfig, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """(context indices, target indices) into the series' tokens; both non-empty, disjoint."""
    n = len(coords)
    if n < 2:
        raise ValueError(f"a series needs at least 2 tokens to be masked, got {n}")
    if cfg.scheme == "tube":
        tube = tube_target(coords, cfg, rng)
        ratio = cfg.context_ratio_ct if modality == "CT" else cfg.context_ratio_mr
        keep_n = int(round(ratio * n))
        ctx = thin_by_slab(coords, ~tube, keep_n, rng)
    else:
        tube = multiblock_target(coords, cfg, rng)
        ctx = ~tube
    ctx_idx = np.flatnonzero(ctx)
    if cfg.context_drop > 0 and ctx_idx.size > 1:
        n_drop = int(round(cfg.context_drop * ctx_idx.size))
        if n_drop:
            ctx_idx = np.sort(rng.choice(ctx_idx, ctx_idx.size - n_drop, replace=False))
    if ctx_idx.size == 0:
        ctx_idx = np.array([rng.integers(n)])
    in_ctx = np.zeros(n, bool)
    in_ctx[ctx_idx] = True
    tgt = ~in_ctx if cfg.targets == "complement" else (tube & ~in_ctx)
    tgt_idx = np.flatnonzero(tgt)
    if tgt_idx.size == 0:  # never leave a series without a target
        tgt_idx = np.flatnonzero(~in_ctx)[:1]
        if tgt_idx.size == 0:
            tgt_idx, ctx_idx = ctx_idx[-1:], ctx_idx[:-1]
    return ctx_idx, tgt_idx
