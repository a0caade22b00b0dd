"""The end-to-end baseline: a small supervised 3-D CNN on the cached scans, no foundation model.

What a frozen encoder plus a head must beat is not only a random-init encoder and intensity
histograms but a plain network trained on the labels. Every series of a study is resampled from
its canonical token grid onto one fixed RAS grid around the head (4 mm slices, 3 mm in-plane), so
a study is one co-registered multi-channel volume (CT: brain, blood and bone windows of the soft-
kernel series; MRI: one channel per sequence family, zeros where the exam has none), plus the
patient's age. One network per modality: a strided stem, three [pool, conv, conv] stages,
BatchNorm, global max + log-sum-exp + mean pooling (lesions are small), a linear head per label;
class-balanced BCE, left-right flip / shift / intensity jitter, warmup + cosine, the epoch with
the best *validation* macro AUROC kept, flip-averaged scores. Optionally a voxel-level head on
the mid-level features learns from lesion masks (``aux``) — used by the archive-difficulty bench
to tell "invisible lesions" from "too few labels".

Used by ``neurovfm evaluate --cnn-baseline`` (scored with the same calibration, operating points
and bootstrap as every head) and by ``bench/synth/difficulty.py``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neurovfm.probe.train import torch_threads, val_macro_auroc
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.patches import unpatchify

FIELD_MM = (160.0, 216.0, 180.0)  # S-I x A-P x L-R: the head and some margin, whatever the spacing
CT_CHANNELS = ("brain", "blood", "bone")
MR_CHANNELS = ("T1", "T1C", "T2", "FLAIR", "DWI", "ADC", "SWI", "PD")
MR_REFERENCE_ORDER = ("T2", "FLAIR", "T1", "PD", "DWI", "T1C", "ADC", "SWI")  # whose head centre the grid uses


@dataclass(frozen=True)
class StudyGrid:
    """The study grid: voxel counts and spacing (mm) along S-I, A-P, L-R, always covering
    ``FIELD_MM``. Finer in-plane spacing keeps thin findings (a 2-5 mm periventricular rim) from
    being averaged away, at the cost of (3 / in-plane mm)^2 more voxels."""

    shape: tuple[int, int, int]
    mm: tuple[float, float, float]

    @classmethod
    def of(cls, inplane_mm: float = 3.0, slice_mm: float = 4.0) -> "StudyGrid":
        if not (1.0 <= inplane_mm <= 6.0 and 1.0 <= slice_mm <= 8.0):
            raise ValueError(f"CNN grid: in-plane spacing must be in [1, 6] mm and slices in [1, 8] mm, "
                             f"not {inplane_mm} / {slice_mm}")
        mm = (float(slice_mm), float(inplane_mm), float(inplane_mm))
        return cls(tuple(int(round(f / s)) for f, s in zip(FIELD_MM, mm)), mm)


DEFAULT_GRID = StudyGrid.of()  # 40 x 72 x 60 voxels of 4 x 3 x 3 mm (every record before 2026-12-05)
GRID, GRID_MM = DEFAULT_GRID.shape, DEFAULT_GRID.mm


@dataclass
class CNNConfig:
    epochs: int = 100  # validation picks the epoch; 30 under-trained the 500-study archive's CNN
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.02
    dropout: float = 0.3
    seed: int = 0
    threads: int | None = None
    aux_weight: float = 0.0  # > 0: lesion masks supervise a voxel head (needs masks)
    # random rigid + scale augmentation per training study (0 = off): rotation up to this many
    # degrees about the S-I axis (half of it about the other two), isotropic scale 1 +- ``scale``
    rotate_deg: float = 0.0
    scale: float = 0.0
    # a seed ensemble: this many networks (seeds ``seed``, ``seed`` + 1, ...) on the same data, scored
    # by their mean logit (+0.014 test macro AUROC for 3 on the default archive; 3x the time)
    ensemble: int = 1
    # box-average every series to the grid's spacing before sampling it (``_resample``): noise
    # falls ~3x; on the default archive better in all 3 seeds (+0.028 mean test macro AUROC,
    # mask-supervised) and steadier across seeds. False: the point sampling of records before 2026-12-05
    antialias: bool = True
    # the grid's in-plane spacing (mm; slices stay 4 mm; StudyGrid): 3 suits 2 CPU cores; 2 has
    # 2.25x the voxels and took ~2.7x the time per epoch on CPU. The shift augmentation is in voxels
    # (+-3), so +-9 mm at 3 mm and +-6 mm at 2 mm
    inplane_mm: float = 3.0
    # the study head also reads the voxel head's peak per lesion class (its spatial maximum, flip-
    # averaged like the scores; detached, so the masks alone train the voxel head): on the default
    # archive the voxel head's maximum out-ranked the study head on MRI stroke and small vessel
    # disease (0.80-0.83 vs 0.73-0.76; 0.67-0.75 vs 0.62-0.68). Needs aux_weight > 0. Measured on the
    # 2 mm grid: no gain (0.824 / 0.839 vs 0.830 / 0.830 for seeds 0 / 1), hence off by default
    seg_to_head: bool = False

    @property
    def grid(self) -> StudyGrid:
        return StudyGrid.of(self.inplane_mm)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 2:
            raise ValueError("CNN baseline: epochs must be >= 1 and batch >= 2 (BatchNorm)")
        if self.lr <= 0 or self.aux_weight < 0:
            raise ValueError("CNN baseline: lr must be > 0 and aux_weight >= 0")
        if not 0 <= self.rotate_deg <= 45 or not 0 <= self.scale < 0.5:
            raise ValueError("CNN baseline: rotate_deg must be in [0, 45] and scale in [0, 0.5)")
        if self.seg_to_head and self.aux_weight <= 0:
            raise ValueError("CNN baseline: seg_to_head reads the voxel head, which only lesion masks train: "
                             "it needs aux_weight > 0")
        if self.ensemble < 1:
            raise ValueError(f"CNN baseline: ensemble must be >= 1 network, not {self.ensemble}")
        self.grid  # noqa: B018 - validates the spacing


# -- study volumes on one grid ------------------------------------------------------------------------
def _dense(cache: TokenCache, e, names=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One series as dense volumes [V, D, H, W] (float32 0..1; tokens not stored are 0), the
    voxel -> RAS affine and the stored token coordinates."""
    views, coords, _ = cache.views(e, names)
    grid = tuple(json.loads(e.grid_shape))
    patch = cache.policy.patch
    full = np.zeros((views.shape[1], int(np.prod(grid)), views.shape[2]), np.float32)
    flat = np.ravel_multi_index(coords.T.astype(int), grid)
    full[:, flat] = np.transpose(views, (1, 0, 2)).astype(np.float32) / 255.0
    vols = np.stack([unpatchify(full[v], grid, patch) for v in range(full.shape[0])])
    s = np.eye(4)
    for ax in range(3):
        s[ax, ax] = patch[ax]
        s[ax, 3] = (patch[ax] - 1) / 2.0
    return vols, e.grid_affine_array @ np.linalg.inv(s), coords


def grid_ras(centre: np.ndarray, grid: StudyGrid = DEFAULT_GRID) -> np.ndarray:
    """RAS mm of every voxel of the study grid around ``centre``: [*grid.shape, 3]."""
    axes = [(np.arange(n) - (n - 1) / 2) * mm for n, mm in zip(grid.shape, grid.mm)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return np.stack([x, y, z], -1) + centre  # R, A, S


def antialias_widths(affine: np.ndarray, grid: StudyGrid = DEFAULT_GRID) -> tuple[int, int, int]:
    """Odd box widths (voxels) per axis of a series' grid that average it to about the study
    grid's finest spacing before sampling: 1 mm in-plane -> 3 (at 3 mm), 4 mm slices -> 1 (left alone).
    Odd, so the box stays centred: on a 2 mm grid a 1 mm series still gets a 3 mm box (the finer
    grid then samples the same smoothing more densely)."""
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    target = min(grid.mm)
    return tuple(int(2 * np.floor(max(target / max(s, 1e-6), 1.0) / 2) + 1) for s in spacing)


def _resample(vols: np.ndarray, affine: np.ndarray, centre: np.ndarray, antialias: bool = False,
              grid: StudyGrid = DEFAULT_GRID) -> np.ndarray:
    """[V, D, H, W] in its own voxel space -> [V, *grid.shape] on the RAS grid around ``centre``.
    Bilinear sampling of a 1 mm series at 3 mm reads 1 voxel in 9 of every slice: its noise stays
    at full strength and thin structures alias. ``antialias`` first box-averages each axis to the
    grid's spacing (``antialias_widths``), so every voxel counts and noise falls about 3x."""
    if antialias:
        k = antialias_widths(affine, grid)
        if max(k) > 1:
            t = torch.from_numpy(np.ascontiguousarray(vols, np.float32))[None]
            vols = F.avg_pool3d(t, k, stride=1, padding=tuple(w // 2 for w in k),
                                count_include_pad=False)[0].numpy()
    inv = np.linalg.inv(affine)
    ijk = grid_ras(centre, grid) @ inv[:3, :3].T + inv[:3, 3]  # voxel (d, h, w) coordinates
    shape = np.array(vols.shape[1:], float)
    norm = 2 * ijk / np.maximum(shape - 1, 1) - 1  # grid_sample wants (x=w, y=h, z=d)
    g = torch.from_numpy(norm[..., ::-1].copy()).float()[None]
    out = F.grid_sample(torch.from_numpy(vols)[None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].numpy()


def study_volume(cache: TokenCache, entries: list, antialias: bool = True,
                 grid: StudyGrid = DEFAULT_GRID) -> tuple[str, np.ndarray, np.ndarray]:
    """A study's co-registered channels on ``grid`` (float16 [C, *grid.shape]) and the grid's RAS
    centre (the mean of the reference series' foreground token centres); ``antialias``: see ``_resample``."""
    mod = entries[0].modality
    if mod == "CT":
        soft = [e for e in entries if e.kernel == "soft"] or entries
        vols, aff, coords = _dense(cache, soft[0], CT_CHANNELS)
    else:
        order = {k: i for i, k in enumerate(MR_REFERENCE_ORDER)}
        ref = sorted(entries, key=lambda e: order.get(e.sequence, 9))[0]
        vols, aff, coords = _dense(cache, ref)
    patch = np.array(cache.policy.patch)
    tok = coords.astype(float) * patch + (patch - 1) / 2
    centre = (tok @ aff[:3, :3].T + aff[:3, 3]).mean(0)
    if mod == "CT":
        return mod, _resample(vols, aff, centre, antialias, grid).astype(np.float16), centre
    out = np.zeros((len(MR_CHANNELS),) + grid.shape, np.float16)
    for e in entries:
        if e.sequence in MR_CHANNELS:
            v, a, _ = _dense(cache, e)
            out[MR_CHANNELS.index(e.sequence)] = _resample(v, a, centre, antialias, grid)[0]
    return mod, out, centre


def study_volumes(cache: TokenCache, study_keys: list[str], antialias: bool = True,
                  grid: StudyGrid = DEFAULT_GRID) -> dict[str, tuple[np.ndarray, float]]:
    """study key -> (channels, age in years or NaN) for the studies in the cache."""
    by: dict[str, list] = {}
    for e in cache.series():
        if e.study_key in study_keys:
            by.setdefault(e.study_key, []).append(e)
    out = {}
    for k in study_keys:
        if k in by:
            age = by[k][0].age_years
            out[k] = (study_volume(cache, by[k], antialias, grid)[1], float(age) if age is not None else float("nan"))
    return out


# -- the network ---------------------------------------------------------------------------------------
def _block(a: int, b: int, stride=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(a, b, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(b), nn.ReLU(inplace=True))


class StudyCNN(nn.Module):
    """3 mm input -> 6 mm in-plane at the stem (2 mm -> 4 mm); pooled features + age -> one logit per label. Age
    goes in because atrophy is labelled 'advanced for age', as a radiologist reads it. ``seg`` is
    the voxel head on the mid-level features (trained only when lesion masks are given). With
    ``seg_to_head`` the head also reads each voxel class's spatial maximum, detached: a detector's
    peak says "there is a lesion" more directly than pooled features do, and detaching keeps the
    voxel head what the masks alone make it."""

    def __init__(self, channels: int, n_labels: int, n_aux: int = 0, dropout: float = 0.3,
                 seg_to_head: bool = False):
        super().__init__()
        if seg_to_head and n_aux < 1:
            raise ValueError("StudyCNN: seg_to_head needs a voxel head (n_aux >= 1)")
        self.seg_to_head = seg_to_head
        self.low = nn.Sequential(_block(channels, 16, (1, 2, 2)), nn.MaxPool3d(2), _block(16, 32), _block(32, 32),
                                 nn.MaxPool3d(2), _block(32, 64), _block(64, 64))
        self.high = nn.Sequential(nn.MaxPool3d(2), _block(64, 128))
        self.seg = nn.Conv3d(64, max(n_aux, 1), 1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(3 * 128 + 1 + (n_aux if seg_to_head else 0), n_labels)

    def forward(self, x: torch.Tensor, age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.low(x)
        f = self.high(mid).flatten(2)
        lse = torch.logsumexp(f * 4, dim=2) / 4 - np.log(f.shape[2]) / 4  # a soft maximum over space
        pooled = torch.cat([f.amax(2), lse, f.mean(2)], 1)
        seg = self.seg(mid)
        extra = [seg.detach().flatten(2).amax(2)] if self.seg_to_head else []
        return self.head(torch.cat([self.drop(pooled), age[:, None], *extra], 1)), seg


def affine_theta(angles_deg: tuple[float, float, float], zoom: float = 1.0,
                 grid: StudyGrid = DEFAULT_GRID) -> torch.Tensor:
    """The ``F.affine_grid`` matrix [3, 4] of a rotation by ``angles_deg`` about L-R, A-P and S-I
    (in that order of application) and a zoom (> 1 enlarges the head), built in millimetres and
    expressed in normalised coordinates: the grid's voxels are not cubes, so a rotation written in
    normalised units would shear the head."""
    (d, h, w), (dm, hm, wm) = grid.shape, grid.mm
    half = torch.tensor([w * wm, h * hm, d * dm], dtype=torch.float64) / 2
    (cx, cy, cz), (sx, sy, sz) = np.cos(np.deg2rad(angles_deg)), np.sin(np.deg2rad(angles_deg))
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    # affine_grid maps output to input coordinates: the inverse of the motion of the head
    inv = (rz @ ry @ rx).T / zoom
    out = torch.zeros(3, 4, dtype=torch.float64)
    out[:, :3] = torch.diag(1 / half) @ inv @ torch.diag(half)
    return out.float()


def random_affine(n: int, rotate_deg: float, scale: float, rng: np.random.Generator,
                  grid: StudyGrid = DEFAULT_GRID) -> torch.Tensor:
    """``n`` random ``affine_theta`` matrices [n, 3, 4]: up to ``rotate_deg`` about S-I and half of
    it about the other two axes, zoom in 1 +- ``scale``."""
    lim = np.array([rotate_deg / 2, rotate_deg / 2, rotate_deg])
    return torch.stack([affine_theta(tuple(rng.uniform(-1, 1, 3) * lim), float(rng.uniform(1 - scale, 1 + scale)), grid)
                        for _ in range(n)])


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample a batch [N, C, D, H, W] through ``theta`` (from ``random_affine``); outside is 0."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def mid_shape(grid: StudyGrid = DEFAULT_GRID) -> tuple[int, int, int]:
    """Spatial shape of the mid level (after the stride-2 stem and two 2x pools): 16 x 24 x 24 mm
    voxels on the 3 mm grid, 16 x 16 x 16 mm on the 2 mm one."""
    d, h, w = grid.shape[0], (grid.shape[1] + 1) // 2, (grid.shape[2] + 1) // 2
    for _ in range(2):
        d, h, w = d // 2, h // 2, w // 2
    return d, h, w


@dataclass
class CNNResult:
    logits: dict[str, np.ndarray]  # study key -> flip-averaged logits [C]
    voxel_max: dict[str, np.ndarray]  # study key -> max of the voxel head [n_aux] (aux only)
    history: list[dict[str, Any]]
    best_epoch: int  # of the first member, for an ensemble
    val_macro_auroc: float  # the ensemble's own, for an ensemble
    members: list["CNNResult"] = field(default_factory=list)  # an ensemble's networks, in seed order


def train_cnn(volumes: dict[str, np.ndarray], age: dict[str, float], y: dict[str, np.ndarray], train: list[str],
              val: list[str], score: list[str], cfg: CNNConfig, masks: dict[str, np.ndarray] | None = None,
              n_aux: int = 0, log: Callable[[str], None] | None = None,
              select: list[int] | None = None) -> CNNResult:
    """Fit on ``train`` (labels [C], NaN = unknown, left out of the loss), keep the epoch with the
    best macro AUROC on ``val`` over the label columns ``select`` (default: all of them), and score
    ``score`` once with it. Training on more labels than are selected on lets rarer findings
    (subtypes, mimics) shape the features. ``volumes`` are on ``cfg.grid``. ``masks``: study key
    -> uint8 bit field [*cfg.grid.shape] (bit i = voxel head i) when ``cfg.aux_weight`` > 0."""
    if len(train) < 2 or not val:
        raise ValueError("CNN baseline: needs at least 2 train studies and 1 validation study")
    n_labels = len(next(iter(y.values())))
    select = list(range(n_labels)) if select is None else list(select)
    if not select or min(select) < 0 or max(select) >= n_labels:
        raise ValueError(f"CNN baseline: selection columns {select} are not among the {n_labels} labels")
    bad = next((k for k, v in volumes.items() if tuple(v.shape[1:]) != cfg.grid.shape), None)
    if bad is not None:
        raise ValueError(f"CNN baseline: study {bad}'s volume is {tuple(volumes[bad].shape[1:])}, not the "
                         f"{cfg.inplane_mm:g} mm grid's {cfg.grid.shape}; resample it with that grid")
    with torch_threads(cfg.threads or os.cpu_count() or 1):
        if cfg.ensemble == 1:
            return _train(volumes, age, y, train, val, score, cfg, masks, n_aux, log, select)
        members = []
        for i in range(cfg.ensemble):
            one = replace(cfg, seed=cfg.seed + i, ensemble=1)
            tagged = (lambda m, s=one.seed: log(m.replace("cnn", f"cnn seed {s}", 1))) if log else None
            members.append(_train(volumes, age, y, train, val, score, one, masks, n_aux, tagged, select))
    logits = {k: np.mean([m.logits[k] for m in members], 0) for k in score}
    vox = {k: np.mean([m.voxel_max[k] for m in members], 0) for k in members[0].voxel_max}
    vkeys = [k for k in val if k in logits]
    vauc = (val_macro_auroc(np.stack([y[k] for k in vkeys])[:, select], np.stack([logits[k] for k in vkeys])[:, select])
            if len(vkeys) == len(val) else float("nan"))
    return CNNResult(logits, vox, members[0].history, members[0].best_epoch, float(vauc), members)


def _train(volumes, age, y, train, val, score, cfg: CNNConfig, masks, n_aux, log, select) -> CNNResult:
    torch.manual_seed(cfg.seed)
    rs = np.random.default_rng(cfg.seed)
    use_aux = cfg.aux_weight > 0 and masks is not None and n_aux > 0
    first = next(iter(volumes.values()))
    n_labels = len(next(iter(y.values())))
    if cfg.seg_to_head and not use_aux:
        raise ValueError("CNN baseline: seg_to_head needs lesion masks and n_aux >= 1 (the voxel head it reads)")
    net = StudyCNN(first.shape[0], n_labels, n_aux if use_aux else 0, cfg.dropout, cfg.seg_to_head)
    ys = np.stack([y[k] for k in train])
    pos = np.nansum(ys, 0)
    known = np.sum(~np.isnan(ys), 0)
    pos_w = torch.tensor((known - pos) / np.maximum(pos, 1), dtype=torch.float32).clamp(0.5, 5)
    steps = cfg.epochs * int(np.ceil(len(train) / cfg.batch))
    warm = max(1, steps // 12)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + np.cos(np.pi * (t - warm) / max(steps - warm, 1))))
    bitw = torch.tensor([1 << i for i in range(max(n_aux, 1))], dtype=torch.int32)
    mean_age = float(np.nanmean([age.get(k, np.nan) for k in train])) if any(np.isfinite(age.get(k, np.nan)) for k in train) else 60.0

    def ages(ks):
        return torch.tensor([((age.get(k, np.nan) if np.isfinite(age.get(k, np.nan)) else mean_age) - 60) / 20
                             for k in ks], dtype=torch.float32)

    def batch_of(ks, augment: bool):
        x = torch.from_numpy(np.stack([volumes[k] for k in ks]).astype(np.float32))
        m = None
        if use_aux:
            m = torch.from_numpy(np.stack([masks.get(k, np.zeros(cfg.grid.shape, np.uint8)) for k in ks]).astype(np.int32))
            m = ((m[:, None] & bitw[None, :, None, None, None]) > 0).float()
        if augment:
            if rs.random() < 0.5:  # left-right: study-level labels are side-free
                x = x.flip(-1)
                m = m.flip(-1) if m is not None else None
            sh = rs.integers(-3, 4, 3)
            shifts = (int(sh[0]) // 2, int(sh[1]), int(sh[2]))
            x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
            m = torch.roll(m, shifts=shifts, dims=(2, 3, 4)) if m is not None else None
            if cfg.rotate_deg > 0 or cfg.scale > 0:
                theta = random_affine(len(ks), cfg.rotate_deg, cfg.scale, rs, cfg.grid)
                x = warp(x, theta)
                m = warp(m, theta, "nearest") if m is not None else None
            x = x * float(rs.uniform(0.92, 1.08)) + float(rs.normal(0, 0.02))
        return x, m

    if use_aux:  # voxel-level class balance: lesion voxels are rare at the mid level
        with torch.no_grad():
            frac = torch.zeros(n_aux)
            for i in range(0, len(train), 16):
                _, m = batch_of(train[i:i + 16], False)
                frac += F.adaptive_max_pool3d(m, mid_shape(cfg.grid)).mean((0, 2, 3, 4)) * len(train[i:i + 16])
            frac /= len(train)
        seg_w = ((1 - frac) / frac.clamp_min(1e-4)).clamp(1, 50)

    def predict(ks):
        net.eval()
        out, vox = {}, {}
        with torch.no_grad():
            for i in range(0, len(ks), 16):
                part = ks[i:i + 16]
                x, _ = batch_of(part, False)
                a = ages(part)
                (c1, s1), (c2, s2) = net(x, a), net(x.flip(-1), a)
                out.update(zip(part, ((c1 + c2) / 2).numpy()))
                vox.update(zip(part, ((s1.flatten(2).amax(2) + s2.flatten(2).amax(2)) / 2).numpy()))
        return out, vox

    best, best_state, best_ep, history = -np.inf, None, 0, []
    yv = np.stack([y[k] for k in val])[:, select]
    for ep in range(cfg.epochs):
        net.train()
        t0 = time.time()
        perm = rs.permutation(len(train))
        losses = []
        for i in range(0, len(train), cfg.batch):
            ks = [train[j] for j in perm[i:i + cfg.batch]]
            if len(ks) < 2:
                continue  # BatchNorm needs two
            yt = torch.from_numpy(np.stack([y[k] for k in ks]).astype(np.float32))
            known_t = ~torch.isnan(yt)
            x, m = batch_of(ks, True)
            logits, seg = net(x, ages(ks))
            per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(yt), pos_weight=pos_w, reduction="none")
            loss = (per * known_t).sum() / known_t.sum().clamp_min(1)
            if use_aux:
                target = F.adaptive_max_pool3d(m, seg.shape[2:])
                loss = loss + cfg.aux_weight * F.binary_cross_entropy_with_logits(
                    seg, target, pos_weight=seg_w[None, :, None, None, None])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"CNN baseline: non-finite loss at epoch {ep}")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        vs, _ = predict(val)
        vauc = val_macro_auroc(yv, np.stack([vs[k] for k in val])[:, select])
        history.append({"epoch": ep, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "val_macro_auroc": vauc, "seconds": time.time() - t0})
        if log:
            log(f"  cnn epoch {ep}: loss {history[-1]['train_loss']:.3f} val macro AUROC {vauc:.3f} "
                f"({time.time() - t0:.0f} s)")
        if best_state is None or (np.isfinite(vauc) and vauc > best):
            best, best_ep = vauc, ep
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    logits, vox = predict(score)
    return CNNResult(logits, vox if use_aux else {}, history, best_ep, float(best))
