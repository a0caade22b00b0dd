"""Token features with their neighbourhood: each token's features and the mean of its neighbours'.

A token's own features say what is inside its 16 mm cube; whether a CSF-like cube is a sulcus, a
ventricle or an old infarct, or whether a bright cube is a tumour's core or its oedema, depends on
what surrounds it. Appending the mean of the neighbouring tokens' features (the present tokens of
the same series view within ``radius`` grid steps, Chebyshev distance, the token itself excluded)
lets a linear token classifier compare a token with its surroundings. ``embed --append-context``
stores such features, ``analyze`` rebuilds them for heads fitted on them, and
:func:`derive_context_store` adds them to an existing feature folder without rerunning the encoder
(the same bytes as embedding with the option).

The same question across a study's series: whether a bright cube is an acute infarct, a glioma or
oedema is told by its signal on the other sequences (DWI, T1, T1c, FLAIR), which one series' token
never sees. :func:`cross_series_mean` gives each token the mean features of the co-located tokens
of the study's other series (nearest token centre in world millimetres, within
``CROSS_SERIES_MM``), so a token classifier reads a multi-sequence signature. It needs the whole
study at once, so it is added by :func:`derive_context_store` (``neurovfm add-context
--cross-series``) and rebuilt by ``analyze``, not by ``embed``'s part-by-part pass.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError

MAX_RADIUS = 3  # a 7x7x7-token (112 mm) neighbourhood: already most of a head
CROSS_SERIES_MM = 16.0  # one token's edge: a co-located token of another series is at most this far
TIE_MM = 1e-3  # distances this close are the same distance (ties are averaged; the limit is inclusive)
TIES = 8  # at most this many tokens of one view tie (the corners of a lattice cube)


class ContextError(NeuroVFMError):
    """Neighbourhood features asked with a bad radius or for a folder that cannot take them."""


def check_radius(radius: int) -> int:
    if not isinstance(radius, (int, np.integer)) or isinstance(radius, bool) or not 1 <= radius <= MAX_RADIUS:
        raise ContextError(f"context radius must be an integer in 1..{MAX_RADIUS} (token steps), not {radius!r}")
    return int(radius)


def neighbourhood_mean(feats: np.ndarray, coords: np.ndarray, radius: int = 1) -> np.ndarray:
    """[n, D] float32: per token, the mean features of the other present tokens of its view within
    ``radius`` grid steps (all three axes). A token with no present neighbour gets its own
    features (its surroundings tell nothing beyond itself). Works on any grid: coordinates are
    shifted to start at zero."""
    radius = check_radius(radius)
    f = np.asarray(feats, np.float32)
    c = np.asarray(coords, np.int64)
    if f.ndim != 2 or c.shape != (len(f), 3):
        raise ContextError(f"features [n, D] and coords [n, 3] must match, got {f.shape} and {c.shape}")
    if not len(f):
        return f.copy()
    c = c - c.min(0) + radius
    shape = tuple(int(s) for s in c.max(0) + radius + 1)
    grid = np.zeros(shape + (f.shape[1],), np.float32)
    present = np.zeros(shape, np.float32)
    idx = (c[:, 0], c[:, 1], c[:, 2])
    if len(np.unique(np.ravel_multi_index(idx, shape))) != len(c):
        raise ContextError("two tokens of one view share a grid position")
    grid[idx] = f
    present[idx] = 1.0
    total = np.zeros((len(f), f.shape[1]), np.float32)
    count = np.zeros(len(f), np.float32)
    for d in itertools.product(range(-radius, radius + 1), repeat=3):
        if d == (0, 0, 0):
            continue
        at = (c[:, 0] + d[0], c[:, 1] + d[1], c[:, 2] + d[2])
        total += grid[at]
        count += present[at]
    alone = count == 0
    out = total / np.maximum(count, 1.0)[:, None]
    out[alone] = f[alone]
    return out


def append_context(feats: list[np.ndarray], coords: list[np.ndarray], radius: int | None) -> list[np.ndarray]:
    """Each view's features [n, D] with their neighbourhood mean appended ([n, 2D]); ``radius`` None:
    unchanged. The mean is taken over the float16-rounded features, as a feature folder stores
    them, so embedding, deriving and ``analyze`` compute the same function."""
    if not radius:
        return feats
    out = []
    for f, c in zip(feats, coords):
        f32 = np.asarray(f, np.float32)
        ctx = neighbourhood_mean(f32.astype(np.float16), c, radius)
        out.append(np.concatenate([f32, ctx], 1))
    return out


def check_cross_series(max_mm: float) -> float:
    if isinstance(max_mm, bool) or not isinstance(max_mm, (int, float, np.floating)) or not 0 < max_mm <= 64:
        raise ContextError(f"cross-series distance must be a number of millimetres in (0, 64], not {max_mm!r}")
    return float(max_mm)


def cross_series_mean(feats: list[np.ndarray], centres: list[np.ndarray], series: list[Any],
                      max_mm: float = CROSS_SERIES_MM) -> list[np.ndarray]:
    """Per view, [n, D] float32: for each token, the mean over the study's views of OTHER series
    (``series``: one id per view; a CT series' windows share one) of that view's token whose centre
    (``centres``: [n, 3] world mm per view) is nearest (tokens tied for nearest: their mean),
    counted only if within ``max_mm``. A token
    with no such partner (a single-series study, or outside the others' coverage) gets its own
    features."""
    max_mm = check_cross_series(max_mm)
    if not len(feats) == len(centres) == len(series):
        raise ContextError(f"{len(feats)} views, {len(centres)} centre arrays and {len(series)} series ids must match")
    f = [np.asarray(x, np.float32) for x in feats]
    c = [np.asarray(x, np.float64) for x in centres]
    for x, y in zip(f, c):
        if x.ndim != 2 or y.shape != (len(x), 3):
            raise ContextError(f"features [n, D] and centres [n, 3] must match, got {x.shape} and {y.shape}")
    trees = [cKDTree(y) if len(y) else None for y in c]
    out = []
    for i, (fi, ci) in enumerate(zip(f, c)):
        total = np.zeros_like(fi)
        count = np.zeros(len(fi), np.float32)
        for j, tree in enumerate(trees):
            if series[j] == series[i] or tree is None or not len(fi):
                continue
            # grids of one study often share a lattice, so a token can be equally far from several
            # of another view's tokens: those (to TIE_MM) are averaged, so the result depends neither
            # on token order nor on rounding of the grid affine (the cache stores it to 1e-6 mm)
            kk = min(TIES, len(c[j]))
            d, k = tree.query(ci, k=kk)
            d, k = d.reshape(len(ci), kk), k.reshape(len(ci), kk)
            tied = d <= d[:, :1] + TIE_MM
            w = tied / tied.sum(1, keepdims=True)
            near = d[:, 0] <= max_mm + TIE_MM
            total[near] += np.einsum("nk,nkd->nd", w[near], f[j][k[near]])
            count[near] += 1
        o = total / np.maximum(count, 1.0)[:, None]
        o[count == 0] = fi[count == 0]
        out.append(o)
    return out


def append_cross_series(feats: list[np.ndarray], base: list[np.ndarray], centres: list[np.ndarray],
                        series: list[Any], max_mm: float | None) -> list[np.ndarray]:
    """``feats`` (each view's features, any neighbourhood already appended) with the cross-series
    mean of ``base`` (the features before the neighbourhood) appended; ``max_mm`` None:
    unchanged. The mean is taken over float16-rounded ``base``, as a feature folder stores it."""
    if not max_mm:
        return feats
    cross = cross_series_mean([np.asarray(b, np.float32).astype(np.float16) for b in base], centres, series, max_mm)
    return [np.concatenate([np.asarray(x, np.float32), y], 1) for x, y in zip(feats, cross)]


def derive_context_store(src: str, out: str, radius: int | None = 1, progress: bool = True,
                         cross_series_mm: float | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """A new feature folder ``out`` holding ``src``'s features with the neighbourhood mean
    (``radius``) and/or the cross-series mean (``cross_series_mm``; needs the ``cache_dir`` the
    features came from, for the token grids' world positions) appended, part by part (resumable:
    finished parts are kept), without rerunning the encoder. The neighbourhood part is what ``embed
    --append-context RADIUS`` writes; ``analyze`` rebuilds both for heads fitted on them."""
    from neurovfm.explain.maps import token_centres_ras
    from neurovfm.probe.embed import FeatureStore, _check_or_write_meta, _part_dir, _write_part, read_part
    from neurovfm.tokens.cache import TokenCache

    if radius is None and cross_series_mm is None:
        raise ContextError("nothing to add: give a neighbourhood radius and/or a cross-series distance")
    radius = check_radius(radius) if radius is not None else None
    cross_series_mm = check_cross_series(cross_series_mm) if cross_series_mm is not None else None
    store = FeatureStore(src)
    if radius and store.meta.get("context_radius"):
        raise ContextError(f"{src}: already holds neighbourhood features (radius {store.meta['context_radius']})")
    if cross_series_mm and store.meta.get("cross_series_mm"):
        raise ContextError(f"{src}: already holds cross-series features ({store.meta['cross_series_mm']} mm)")
    if cross_series_mm and not cache_dir:
        raise ContextError("cross-series features need the token cache the features were embedded from (--cache)")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ContextError(f"{out}: the output must be a new folder, not the source")
    base_dim = store.dim // 2 if store.meta.get("context_radius") else store.dim
    dim = store.dim + (store.dim if radius else 0) + (base_dim if cross_series_mm else 0)
    meta = {**store.meta, "dim": dim}
    if radius:
        meta["context_radius"] = radius
    if cross_series_mm:
        meta["cross_series_mm"] = cross_series_mm
    cache = TokenCache(cache_dir) if cross_series_mm else None
    affines: dict[str, np.ndarray] = {}

    def centres_of(v) -> np.ndarray:
        if v.series_key not in affines:
            try:
                affines[v.series_key] = cache.get(v.series_key).grid_affine_array
            except KeyError:
                raise ContextError(f"{src}: series {v.series_key[:12]}… is not in the cache {cache_dir}; give the "
                                   "cache these features were embedded from") from None
        return token_centres_ras(affines[v.series_key], v.coords)

    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    _check_or_write_meta(out, meta)
    todo = [i for i in range(store.meta["n_parts"]) if not os.path.isdir(_part_dir(out, i))]
    try:
        for i in tqdm(todo, desc="context", unit="part", disable=not progress):
            rows, f, c, k = read_part(src, i, store.dim)
            spans = [(r["offset"], r["offset"] + r["n_tokens"]) for r in rows]
            views = append_context([f[s:e] for s, e in spans], [c[s:e] for s, e in spans], radius)
            if cross_series_mm:
                crossed, per_study = [], {}
                for r, v in zip(rows, views):  # each view against all of its study's views, wherever stored
                    study = store.bag_views(r["study_key"])
                    if r["study_key"] not in per_study:
                        per_study[r["study_key"]] = cross_series_mean(
                            [w.feats[:, :base_dim] for w in study], [centres_of(w) for w in study],
                            [w.series_key for w in study], cross_series_mm)
                    mine = next(j for j, w in enumerate(study) if w.series_key == r["series_key"] and w.view == r["view"])
                    crossed.append(np.concatenate([np.asarray(v, np.float32), per_study[r["study_key"]][mine]], 1))
                views = crossed
            _write_part(_part_dir(out, i), np.concatenate(views).astype(np.float16), np.asarray(c), k, rows)
    finally:
        if cache is not None:
            cache.close()
    done = sum(os.path.isdir(_part_dir(out, i)) for i in range(store.meta["n_parts"]))
    return {"out": out, "parts_done": done, "parts": store.meta["n_parts"], "complete": done == store.meta["n_parts"],
            "dim": meta["dim"], "context_radius": meta.get("context_radius"), "cross_series_mm": cross_series_mm}
