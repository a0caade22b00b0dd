"""The pretraining data path: token cache -> token-budget batches of masked series.

- Reads only the splits it is told to (from a keyed ``labels.csv`` with ``study_key`` and
  ``split`` columns; see ``neurovfm rekey``), so evaluation studies never reach pretraining.
- Checks the cache's schema hash before reading.
- The unit of an epoch is the study: every study once, in a new order each epoch
  (``seed``, ``epoch``), dealt round-robin to ranks, packed by a token budget (not a series
  count). Every rank computes the same plan and keeps the same number of batches, so DDP
  never waits on a rank that ran out.
- Randomness per series (CT window 0.70 / 0.15 / 0.15, crop, flips, mask) comes from a stream
  keyed by (seed, epoch, series key): independent of batch packing, worker and rank, so a
  resumed run or a different worker count sees exactly the same samples.

Laterality: a flip of the grid axis that runs patient left-right swaps left and right; the
transpose exchanges the in-plane axes. Both are harmless for self-supervision but must stay
off for anything side-aware (probes with laterality, maps). They are off by default.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from neurovfm.errors import NeuroVFMError
from neurovfm.models.packing import Packed
from neurovfm.pretrain.masks import MaskConfig, make_mask
from neurovfm.tokens.cache import TokenCache, schema_hash
from neurovfm.tokens.normalize import normalize


class DataConfigError(NeuroVFMError):
    """The pretraining data cannot be set up as configured (missing splits, empty selection...)."""


@dataclass(frozen=True)
class DataConfig:
    cache: str = ""
    splits_csv: str = ""  # keyed labels.csv (study_key, split); required unless allow_all_studies
    splits: tuple[str, ...] = ("train",)
    allow_all_studies: bool = False
    modalities: tuple[str, ...] = ("CT", "MR")
    tokens_per_batch: int = 8192  # per rank; foreground tokens of the full series (teacher input)
    max_tokens_per_series: int = 4096  # larger series are cropped to a random slab
    ct_window_probs: tuple[float, float, float] = (0.70, 0.15, 0.15)  # brain, blood, bone
    crop: tuple[int, int, int] | None = None  # max tokens per axis (d, h, w), random position
    flip_p: float = 0.0  # per in-plane axis
    transpose_p: float = 0.0  # exchange in-plane axes
    workers: int = 0

    def __post_init__(self) -> None:
        if abs(sum(self.ct_window_probs) - 1.0) > 1e-6 or min(self.ct_window_probs) < 0:
            raise ValueError(f"ct_window_probs must be non-negative and sum to 1, got {self.ct_window_probs}")
        if self.tokens_per_batch < 16 or self.max_tokens_per_series < 16:
            raise ValueError("tokens_per_batch and max_tokens_per_series must be at least 16")
        if self.crop is not None and (len(self.crop) != 3 or min(self.crop) < 1):
            raise ValueError(f"crop must be three positive token counts, got {self.crop}")
        for p in (self.flip_p, self.transpose_p):
            if not 0 <= p <= 1:
                raise ValueError("flip_p and transpose_p are probabilities")


@dataclass(frozen=True)
class SeriesRef:
    series_key: str
    study_key: str
    modality: str
    n_tokens: int
    grid_shape: tuple[int, int, int]


@dataclass
class Study:
    study_key: str
    series: list[SeriesRef] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.series)


def read_splits(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        raise DataConfigError(f"{path}: splits file not found (a keyed labels.csv from `neurovfm rekey`)")
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        if not r.fieldnames or "study_key" not in r.fieldnames or "split" not in r.fieldnames:
            raise DataConfigError(f"{path}: needs 'study_key' and 'split' columns (got {r.fieldnames})")
        return {row["study_key"]: row["split"] for row in r}


def select_studies(cfg: DataConfig, min_tokens: int) -> list[Study]:
    """Studies of the requested splits and modalities, in a fixed (key) order."""
    if not cfg.cache:
        raise DataConfigError("data.cache is not set")
    cache = TokenCache(cfg.cache)
    try:
        cache.check(schema=schema_hash())
        rows = cache.series()
    finally:
        cache.close()
    if cfg.splits_csv:
        splits = read_splits(cfg.splits_csv)
        wanted = set(cfg.splits)
        keep = {k for k, s in splits.items() if s in wanted}
    elif cfg.allow_all_studies:
        keep = None
    else:
        raise DataConfigError("data.splits_csv is required (pretrain on train only, so evaluation stays clean); "
                              "set data.allow_all_studies: true to use every study on purpose")
    studies: dict[str, Study] = {}
    for e in rows:
        if keep is not None and e.study_key not in keep:
            continue
        if e.modality not in cfg.modalities or int(e.n_tokens) < min_tokens:
            continue
        ref = SeriesRef(e.series_key, e.study_key, e.modality, int(e.n_tokens), tuple(json.loads(e.grid_shape)))
        studies.setdefault(e.study_key, Study(e.study_key)).series.append(ref)
    if not studies:
        raise DataConfigError(f"{cfg.cache}: no series selected (splits {list(cfg.splits)}, "
                              f"modalities {list(cfg.modalities)}); check the splits file matches this cache's keys")
    return [studies[k] for k in sorted(studies)]


def plan_epoch(studies: list[Study], seed: int, epoch: int, world: int, budget: int, cap: int
               ) -> list[list[list[SeriesRef]]]:
    """Per rank, the epoch's batches (lists of series); every rank gets the same count."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(studies))
    per_rank: list[list[list[SeriesRef]]] = []
    for r in range(world):
        batches: list[list[SeriesRef]] = []
        cur: list[SeriesRef] = []
        used = 0
        for si in order[r::world]:
            for s in studies[si].series:
                n = min(s.n_tokens, cap)
                if cur and used + n > budget:
                    batches.append(cur)
                    cur, used = [], 0
                cur.append(s)
                used += n
        if cur:
            batches.append(cur)
        per_rank.append(batches)
    n = min(len(b) for b in per_rank)
    return [b[:n] for b in per_rank]


def series_rng(seed: int, epoch: int, series_key: str) -> np.random.Generator:
    """The series' own stream for this epoch (stable across processes: no Python ``hash``)."""
    key = int(hashlib.sha256(series_key.encode()).hexdigest()[:15], 16)
    return np.random.default_rng([seed, epoch, key])


# token kinds for the attention monitor: share of attention on air and bone
KIND_SOFT, KIND_AIR, KIND_BONE = 0, 1, 2


def token_kinds(u8: np.ndarray, view: str) -> np.ndarray:
    """Coarse token class from the uint8 view: mostly dark (air or cortical bone on MRI),
    mostly bone (CT, HU >= 300 read from the bone window), else soft tissue."""
    kinds = np.zeros(len(u8), np.int8)
    if view == "bone":  # bone window: -800..2000 HU over 0..255
        hu = u8.astype(np.float32) / 255.0 * 2800.0 - 800.0
        kinds[(hu <= -200).mean(1) >= 0.25] = KIND_AIR
        kinds[(hu >= 300).mean(1) >= 0.25] = KIND_BONE
    else:
        kinds[(u8 <= 12).mean(1) >= 0.5] = KIND_AIR
        if view in ("brain", "blood"):
            kinds[(u8 >= 255).mean(1) >= 0.5] = KIND_BONE
    return kinds


@dataclass
class JEPABatch:
    """A packed batch with its masks (indices are into the packed token rows)."""

    packed: Packed
    ctx_idx: torch.Tensor
    tgt_idx: torch.Tensor
    cu_ctx: list[int]
    cu_tgt: list[int]
    modality: list[str]
    views: list[str]
    kinds: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.packed.tokens.shape[0])


def _augment(tok: np.ndarray, coords: np.ndarray, cfg: DataConfig, rng: np.random.Generator, patch):
    """Crop (per-axis token bounds, then the per-series cap), flips and transpose on tokens."""
    if cfg.crop is not None:
        lo = coords.min(0)
        ext = coords.max(0) - lo + 1
        start = [lo[a] + (rng.integers(0, ext[a] - cfg.crop[a] + 1) if ext[a] > cfg.crop[a] else 0) for a in range(3)]
        keep = np.all((coords >= start) & (coords < np.array(start) + cfg.crop), axis=1)
        if keep.any():
            tok, coords = tok[keep], coords[keep]
    if len(coords) > cfg.max_tokens_per_series:  # contiguous slab of slices within the cap
        d = coords[:, 0]
        order = np.argsort(d, kind="stable")
        start = rng.integers(0, len(coords) - cfg.max_tokens_per_series + 1)
        sel = np.sort(order[start:start + cfg.max_tokens_per_series])
        tok, coords = tok[sel], coords[sel]
    pd, ph, pw = patch
    if cfg.flip_p or cfg.transpose_p:
        t = tok.reshape(-1, pd, ph, pw)
        coords = coords.copy()
        for axis in (1, 2):
            if rng.random() < cfg.flip_p:
                t = t[:, :, ::-1, :] if axis == 1 else t[:, :, :, ::-1]
                coords[:, axis] = coords[:, axis].max() - coords[:, axis]
        if ph == pw and rng.random() < cfg.transpose_p:
            t = t.transpose(0, 1, 3, 2)
            coords = coords[:, [0, 2, 1]]
        tok = np.ascontiguousarray(t).reshape(len(t), -1)
    return tok, coords


class BatchLoader:
    """Builds one rank's ``JEPABatch`` for a planned list of series (opens the cache lazily,
    so each DataLoader worker has its own SQLite connection and memory maps)."""

    def __init__(self, cfg: DataConfig, mask: MaskConfig, seed: int):
        self.cfg, self.mask, self.seed = cfg, mask, seed
        self._cache: TokenCache | None = None

    @property
    def cache(self) -> TokenCache:
        if self._cache is None:
            self._cache = TokenCache(self.cfg.cache)
        return self._cache

    def load(self, series: list[SeriesRef], epoch: int) -> JEPABatch:
        parts, ctxs, tgts, mods, views, kinds = [], [], [], [], [], []
        windows = tuple(w.name for w in self.cache.policy.ct_windows)
        patch = self.cache.policy.patch
        for s in series:
            rng = series_rng(self.seed, epoch, s.series_key)
            if s.modality == "CT":
                view = windows[rng.choice(len(windows), p=self.cfg.ct_window_probs)]
                u8, coords, _ = self.cache.views(s.series_key, [view])
            else:
                view = "mr"
                u8, coords, _ = self.cache.views(s.series_key)
                u8 = u8[:, :1]
            tok, coords = _augment(np.asarray(u8[:, 0]), np.asarray(coords, np.int64), self.cfg, rng, patch)
            c, t = make_mask(coords, s.modality, self.mask, rng)
            parts.append((normalize(tok, view), torch.from_numpy(coords)))
            ctxs.append(c)
            tgts.append(t)
            mods.append(s.modality)
            views.append(view)
            kinds.append(token_kinds(tok, view))
        packed = Packed.cat(parts)
        off = packed.cu[:-1]
        ctx_idx = torch.from_numpy(np.concatenate([c + o for c, o in zip(ctxs, off)]))
        tgt_idx = torch.from_numpy(np.concatenate([t + o for t, o in zip(tgts, off)]))
        cu_ctx = [0] + list(np.cumsum([len(c) for c in ctxs]).tolist())
        cu_tgt = [0] + list(np.cumsum([len(t) for t in tgts]).tolist())
        return JEPABatch(packed, ctx_idx, tgt_idx, cu_ctx, cu_tgt, mods, views, torch.from_numpy(np.concatenate(kinds)))


class EpochBatches(torch.utils.data.Dataset):
    """Map-style view of one rank's planned batches for one epoch (for a DataLoader)."""

    def __init__(self, loader: BatchLoader, batches: list[list[SeriesRef]], epoch: int):
        self.loader, self.batches, self.epoch = loader, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> JEPABatch:
        return self.loader.load(self.batches[i], self.epoch)


def epoch_iterator(loader: BatchLoader, batches: list[list[SeriesRef]], epoch: int, start: int, workers: int):
    """Batches ``start..`` of an epoch, optionally prepared by worker processes."""
    ds = EpochBatches(loader, batches, epoch)
    idx = list(range(start, len(ds)))
    if workers <= 0:
        for i in idx:
            yield i, ds[i]
        return
    dl = torch.utils.data.DataLoader(ds, batch_size=None, sampler=idx, num_workers=workers,
                                     collate_fn=lambda b: b, persistent_workers=False, prefetch_factor=2)
    for i, b in zip(idx, dl):
        yield i, b
