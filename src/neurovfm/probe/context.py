"""Token features with their neighbourhood: each token's features and the mean of its neighbours'.

A token's own features say what is inside its 16 mm cube; whether a CSF-like cube is a sulcus, a
ventricle or an old infarct, or whether a bright cube is a tumour's core or its oedema, depends on
what surrounds it. Appending the mean of the neighbouring tokens' features (the present tokens of
the same series view within ``radius`` grid steps, Chebyshev distance, the token itself excluded)
lets a linear token classifier compare a token with its surroundings. ``embed --append-context``
stores such features, ``analyze`` rebuilds them for heads fitted on them, and
:func:`derive_context_store` adds them to an existing feature folder without rerunning the encoder
(the same bytes as embedding with the option).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError

MAX_RADIUS = 3  # a 7x7x7-token (112 mm) neighbourhood: already most of a head


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


def derive_context_store(src: str, out: str, radius: int, progress: bool = True) -> dict[str, Any]:
    """A new feature folder ``out`` holding ``src``'s features with the neighbourhood mean appended,
    part by part (resumable: finished parts are kept), without rerunning the encoder. The result
    is what ``embed --append-context RADIUS`` writes for the same encoder, cache and options."""
    from neurovfm.probe.embed import FeatureStore, _check_or_write_meta, _part_dir, _write_part, read_part

    radius = check_radius(radius)
    store = FeatureStore(src)
    if store.meta.get("context_radius"):
        raise ContextError(f"{src}: already holds neighbourhood features (radius {store.meta['context_radius']})")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ContextError(f"{out}: the output must be a new folder, not the source")
    meta = {**store.meta, "dim": 2 * store.dim, "context_radius": radius}
    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    _check_or_write_meta(out, meta)
    todo = [i for i in range(store.meta["n_parts"]) if not os.path.isdir(_part_dir(out, i))]
    for i in tqdm(todo, desc="context", unit="part", disable=not progress):
        rows, f, c, k = read_part(src, i, store.dim)
        spans = [(r["offset"], r["offset"] + r["n_tokens"]) for r in rows]
        views = append_context([f[s:e] for s, e in spans], [c[s:e] for s, e in spans], radius)
        _write_part(_part_dir(out, i), np.concatenate(views).astype(np.float16), np.asarray(c), k, rows)
    done = sum(os.path.isdir(_part_dir(out, i)) for i in range(store.meta["n_parts"]))
    return {"out": out, "parts_done": done, "parts": store.meta["n_parts"], "complete": done == store.meta["n_parts"],
            "dim": meta["dim"], "context_radius": radius}
