"""Frozen-encoder token features for a whole cache: computed once, stored compactly, read by
every head, probe and baseline.

    FEATURES/
      meta.json                 format, encoder id (sha256 of its weights) and config, cache schema
                                and policy hashes, the work plan's hash, dim, dtype, parts planned
      parts/p00000/             one part = a fixed group of series views, written to a temporary
        feats.f16                 directory and renamed, so a killed run never leaves half a part
        coords.i16                [n, 3] token grid coordinates (for maps and the anatomy probe)
        kinds.i8                  [n] token kind (soft tissue / air / bone) for the shortcut checks
        index.json                one row per series view: keys, modality, view, offset, length

The plan (which series views go into which part) depends only on the cache and the options, so
``--shard i/N`` processes run the same plan and take parts i, i+N, ...; a rerun skips finished
parts (resumable). A CT series contributes one view per window (brain, blood, bone by default),
an MRI series one view, each embedded as its own series (attention never crosses them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError
from neurovfm.models.config import EncoderConfig
from neurovfm.models.encoder import resolve_readout
from neurovfm.models.folder import load_encoder, read_config
from neurovfm.models.packing import Packed
from neurovfm.probe.context import ContextError, append_context, append_cross_series, check_radius
from neurovfm.pretrain.data import read_splits, token_kinds
from neurovfm.tokens.cache import TokenCache, atomic_write_text, schema_hash
from neurovfm.tokens.normalize import normalize, view_of

FORMAT = "neurovfm-features"
FORMAT_VERSION = 1


class FeatureStoreError(NeuroVFMError):
    """A feature folder is incomplete, of another format, or made by another encoder or cache."""


@dataclass
class EmbedConfig:
    """How to embed: batch size in tokens, which CT windows, part size, device and precision."""

    tokens_per_batch: int = 16384
    part_tokens: int = 200_000
    ct_windows: list[str] | None = None  # None: every window of the cache's policy
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA)
    attention: str = "auto"
    splits: list[str] = field(default_factory=list)  # empty: every study in the cache
    # which blocks' outputs are the features (mean of each through the final norm; negative: from
    # the end); None: the last block, as the encoder was trained. Intermediate blocks keep more of
    # a token's own content, which matters when the last layers have partly collapsed.
    layers: list[int] | None = None
    # append each token's intensity histogram (this many bins per view, as ``histogram:BINS``) to the
    # encoder's features: a head then reads what the network learned and the token's raw intensity
    # distribution side by side (None: encoder features only)
    append_histogram: int | None = None
    # append each token's neighbourhood: the mean features of the other tokens of its series view
    # within this many grid steps (probe.context; None: none). Doubles the dimension.
    append_context: int | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_batch < 16 or self.part_tokens < 16:
            raise ValueError("tokens_per_batch and part_tokens must be at least 16")
        if self.append_histogram is not None and not 2 <= self.append_histogram <= 256:
            raise ValueError(f"append_histogram (bins) must be in 2..256, not {self.append_histogram}")
        if self.append_context is not None:
            try:
                check_radius(self.append_context)
            except ContextError as e:
                raise ValueError(str(e)) from None
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")


@dataclass(frozen=True)
class ViewRef:
    """One series view to embed."""

    series_key: str
    study_key: str
    modality: str
    view: str
    n_tokens: int


def encoder_id(model_folder: str) -> str:
    """sha256 of the encoder weights file: features name the exact weights that made them."""
    h = hashlib.sha256()
    with open(os.path.join(model_folder, "encoder.safetensors"), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plan_views(cache: TokenCache, cfg: EmbedConfig, splits_csv: str | None) -> list[ViewRef]:
    keep = None
    if cfg.splits:
        if not splits_csv:
            raise FeatureStoreError("--splits needs --splits-csv (a keyed labels.csv from `neurovfm rekey`)")
        wanted = set(cfg.splits)
        keep = {k for k, s in read_splits(splits_csv).items() if s in wanted}
    windows = cfg.ct_windows or [w.name for w in cache.policy.ct_windows]
    known = {w.name for w in cache.policy.ct_windows}
    bad = [w for w in windows if w not in known]
    if bad:
        raise FeatureStoreError(f"unknown CT window(s) {bad}; the cache has {sorted(known)}")
    refs = []
    for e in sorted(cache.series(), key=lambda e: (e.study_key, e.series_key)):
        if keep is not None and e.study_key not in keep:
            continue
        views = windows if e.modality == "CT" else [e.views_tuple[0]]
        for v in views:
            refs.append(ViewRef(e.series_key, e.study_key, e.modality, v, int(e.n_tokens)))
    if not refs:
        raise FeatureStoreError(f"{cache.root}: no series to embed (splits {cfg.splits or 'all'})")
    return refs


def plan_parts(refs: list[ViewRef], part_tokens: int) -> list[list[ViewRef]]:
    parts, cur, n = [], [], 0
    for r in refs:
        if cur and n + r.n_tokens > part_tokens:
            parts.append(cur)
            cur, n = [], 0
        cur.append(r)
        n += r.n_tokens
    if cur:
        parts.append(cur)
    return parts


def _plan_hash(parts: list[list[ViewRef]]) -> str:
    h = hashlib.sha256()
    for i, p in enumerate(parts):
        for r in p:
            h.update(f"{i}|{r.series_key}|{r.view}|{r.n_tokens}\n".encode())
    return h.hexdigest()[:16]


def _batches(items: list[ViewRef], budget: int) -> Iterator[list[int]]:
    cur, n = [], 0
    for i, r in enumerate(items):
        if cur and n + r.n_tokens > budget:
            yield cur
            cur, n = [], 0
        cur.append(i)
        n += r.n_tokens
    if cur:
        yield cur


def _write_part(path: str, feats: np.ndarray, coords: np.ndarray, kinds: np.ndarray, rows: list[dict]) -> None:
    tmp = path + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, arr in (("feats.f16", feats), ("coords.i16", coords), ("kinds.i8", kinds)):
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(np.ascontiguousarray(arr).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    atomic_write_text(os.path.join(tmp, "index.json"), json.dumps(rows))
    if os.path.exists(path):  # an identical part from a concurrent duplicate run: keep the first
        shutil.rmtree(tmp)
        return
    os.replace(tmp, path)


HISTOGRAM_PREFIX = "histogram:"
HISTOGRAM_VIEWS = ("brain", "blood", "bone", "mr")


class HistogramFeaturizer:
    """The intensity-histogram baseline as a 'frozen encoder': each token becomes the histogram of
    its voxels (``bins`` bins of the uint8 view, fractions), placed in its view's block, so that
    mean pooling over a study gives per-window study histograms and every head, metric and
    command treats the baseline exactly like a learned encoder."""

    def __init__(self, bins: int):
        if not 2 <= bins <= 256:
            raise FeatureStoreError(f"histogram bins must be in 2..256, not {bins}")
        self.bins = bins
        self.dim = bins * len(HISTOGRAM_VIEWS)

    def __call__(self, tok_u8: np.ndarray, view: str) -> np.ndarray:
        idx = (tok_u8.astype(np.int64) * self.bins) >> 8  # [n, T] bin of each voxel
        n = len(tok_u8)
        block = HISTOGRAM_VIEWS.index(view) * self.bins
        # one bincount over (token, column) cells: 13x faster than np.add.at, the same counts
        # (bench/encoder/histogram_featurizer.py, bench/results/histogram_featurizer_cpu.json);
        # analyze runs this for heads on appended histograms
        cells = (np.arange(n)[:, None] * self.dim + block + idx).ravel()
        out = np.bincount(cells, minlength=n * self.dim).reshape(n, self.dim).astype(np.float32)
        out /= tok_u8.shape[1]
        return out


def append_histograms(feats: list[np.ndarray], views: list[tuple[np.ndarray, str]], bins: int | None
                      ) -> list[np.ndarray]:
    """Each view's features [n, D] with its tokens' intensity histograms appended ([n, D + 4 * bins]):
    ``views`` holds each view's uint8 tokens [n, T] and view name. ``bins`` None: unchanged. Used by
    ``embed --append-histogram`` and by ``analyze`` for heads fitted on such features."""
    if not bins:
        return feats
    hist = HistogramFeaturizer(bins)
    return [np.concatenate([np.asarray(f, np.float32), hist(np.asarray(u8), view)], 1)
            for f, (u8, view) in zip(feats, views)]


def head_inputs(feats: list[np.ndarray], views: list[tuple[np.ndarray, np.ndarray, str]], bins: int | None,
                radius: int | None, cross_series_mm: float | None = None, centres: list[np.ndarray] | None = None,
                series: list | None = None) -> list[np.ndarray]:
    """Each view's features as a head fitted on them reads them: ``views`` holds each view's uint8
    tokens [n, T], coords [n, 3] and view name; the histograms (``bins``) are appended first, then
    the neighbourhood of the result (``radius``), then the cross-series mean of the result before
    the neighbourhood (``cross_series_mm``; needs every view of the study, with token ``centres``
    in world mm and a ``series`` id per view). ``embed`` / ``add-context`` store this and
    ``analyze`` rebuilds it, so the order is defined here only."""
    base = append_histograms(feats, [(u8, view) for u8, _, view in views], bins)
    out = append_context(base, [c for _, c, _ in views], radius)
    if cross_series_mm:
        if centres is None or series is None:
            raise ContextError("cross-series features need each view's token centres and series")
        out = append_cross_series(out, base, centres, series, cross_series_mm)
    return out


def readout_of(depth: int, layers: list[int] | None) -> list[int] | None:
    """The readout as stored in feature and head metadata: ``None`` for the last block alone (so
    ``[-1]`` and the default name the same features), else sorted absolute block indices."""
    r = list(resolve_readout(layers, depth))
    return None if r == [depth - 1] else r


def _featurizer_meta(model: str) -> tuple[str, dict[str, Any], int]:
    """(id, description, dim) of a model folder or of ``histogram:BINS``."""
    if model.startswith(HISTOGRAM_PREFIX):
        bins = int(model[len(HISTOGRAM_PREFIX):] or 32)
        h = HistogramFeaturizer(bins)
        return f"histogram-{bins}", {"kind": "histogram", "bins": bins, "views": list(HISTOGRAM_VIEWS)}, h.dim
    mcfg = read_config(model)
    return encoder_id(model), mcfg["encoder"], int(mcfg["encoder"]["width"])


def embed(model_folder: str, cache_dir: str, out_dir: str, cfg: EmbedConfig | None = None,
          splits_csv: str | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, Any]:
    """Embed every planned series view of ``cache_dir`` with the encoder of ``model_folder``
    (or, with ``histogram:BINS``, the intensity-histogram baseline)."""
    cfg = cfg or EmbedConfig()
    k, n_shards = shard
    if not 0 <= k < n_shards:
        raise FeatureStoreError(f"shard {k}/{n_shards}: index must be in 0..{n_shards - 1}")
    ident, described, dim = _featurizer_meta(model_folder)
    hist = HistogramFeaturizer(described["bins"]) if described.get("kind") == "histogram" else None
    if hist is not None and cfg.layers is not None:
        raise FeatureStoreError("--layers picks encoder blocks; the histogram baseline has none")
    if hist is not None and cfg.append_histogram:
        raise FeatureStoreError("--append-histogram adds histograms to an encoder's features; "
                                "the histogram baseline is histograms already")
    if cfg.append_histogram:
        dim += HistogramFeaturizer(cfg.append_histogram).dim
    if cfg.append_context:
        dim *= 2
    try:
        readout = None if hist else readout_of(EncoderConfig.from_dict(described).depth, cfg.layers)
    except ValueError as e:
        raise FeatureStoreError(f"{model_folder}: {e}") from None
    enc = None if hist else load_encoder(model_folder, map_location=cfg.device, attention=cfg.attention).eval()
    cache = TokenCache(cache_dir)
    try:
        cache.check(schema=schema_hash())
        refs = plan_views(cache, cfg, splits_csv)
        parts = plan_parts(refs, cfg.part_tokens)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "encoder_id": ident, "encoder": described,
            "cache_schema_hash": schema_hash(), "policy_hash": cache.policy_hash,
            "plan_hash": _plan_hash(parts), "n_parts": len(parts), "n_views": len(refs),
            "n_tokens": int(sum(r.n_tokens for r in refs)), "dim": dim,
            "dtype": "float16", "options": {"ct_windows": cfg.ct_windows, "splits": cfg.splits},
            "readout_layers": readout, "histogram_bins": cfg.append_histogram,
        }
        if cfg.append_context:  # absent otherwise, so folders made before the option keep their meta
            meta["context_radius"] = cfg.append_context
        os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
        _check_or_write_meta(out_dir, meta)
        mine = [i for i in range(len(parts)) if i % n_shards == k]
        todo = [i for i in mine if not os.path.isdir(_part_dir(out_dir, i))]
        bar = tqdm(total=sum(sum(r.n_tokens for r in parts[i]) for i in todo), disable=not progress,
                   desc=f"embed {k}/{n_shards}", unit="tok", unit_scale=True)
        cast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and cfg.device != "cpu")
        for i in todo:
            items = parts[i]
            feats, coords_all, kinds_all, rows, off = [], [], [], [], 0
            for idx in _batches(items, cfg.tokens_per_batch):
                pk, kinds, hf, raw = [], [], [], []  # raw: (uint8 tokens, coords, view) of each view
                for j in idx:
                    r = items[j]
                    u8, coords, _ = cache.views(r.series_key, [r.view] if r.modality == "CT" else None)
                    tok = np.asarray(u8[:, 0])
                    view = view_of(r.modality, r.view if r.modality == "CT" else None)
                    if hist is not None:
                        hf.append(hist(tok, view))
                    else:
                        pk.append((normalize(tok, view), torch.from_numpy(np.asarray(coords, np.int64))))
                    raw.append((tok, coords, view))
                    kinds.append(token_kinds(tok, view))
                    coords_all.append(np.asarray(coords, np.int16))
                # the batch's rows are its views' tokens, view after view
                per_view = hf if hist is not None else np.split(_forward(enc, pk, cfg.device, cast, readout),
                                                                np.cumsum([len(t) for t, _, _ in raw])[:-1])
                out = np.concatenate(head_inputs(per_view, raw, cfg.append_histogram, cfg.append_context))
                feats.append(out.astype(np.float16))
                kinds_all.extend(kinds)
                for j in idx:
                    r = items[j]
                    rows.append({"series_key": r.series_key, "study_key": r.study_key, "modality": r.modality,
                                 "view": r.view, "offset": off, "n_tokens": r.n_tokens})
                    off += r.n_tokens
                bar.update(sum(items[j].n_tokens for j in idx))
            _write_part(_part_dir(out_dir, i), np.concatenate(feats), np.concatenate(coords_all),
                        np.concatenate(kinds_all), rows)
        bar.close()
    finally:
        cache.close()
    done = sum(os.path.isdir(_part_dir(out_dir, i)) for i in range(len(parts)))
    return {"out": out_dir, "parts_done": done, "parts": len(parts), "complete": done == len(parts),
            "tokens": meta["n_tokens"], "views": len(refs)}


def _forward(enc: torch.nn.Module, pk: list[tuple[torch.Tensor, torch.Tensor]], device: str, cast,
             readout: list[int] | None = None) -> np.ndarray:
    """One packed forward pass: each (normalised tokens, coords) pair is its own sequence."""
    packed = Packed.cat(pk).to(device)
    with torch.inference_mode(), cast:
        h = enc(packed) if readout is None else enc(packed, readout_layers=readout)
    return h.float().cpu().numpy()


def encode_views(enc: torch.nn.Module, views: list[tuple[np.ndarray, np.ndarray, str]],
                 tokens_per_batch: int = 16384, device: str = "cpu", precision: str = "fp32",
                 readout: list[int] | None = None) -> list[np.ndarray]:
    """Frozen float32 features of in-memory series views ``(uint8 tokens [n, T], coords [n, 3],
    view name)``, packed by token budget exactly as :func:`embed` does for a cache (``analyze``
    uses this, so one study and a whole archive go through the same encoder path); ``readout``
    as stored in the features' metadata (None: the last block)."""
    cast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and device != "cpu")
    out: list[np.ndarray] = []
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []
    lengths: list[int] = []

    def flush() -> None:
        if batch:
            h = _forward(enc, batch, device, cast, readout)
            out.extend(np.split(h, np.cumsum(lengths)[:-1]))
            batch.clear()
            lengths.clear()

    for u8, coords, view in views:
        n = len(u8)
        if batch and sum(lengths) + n > tokens_per_batch:
            flush()
        batch.append((normalize(np.asarray(u8), view), torch.from_numpy(np.asarray(coords, np.int64))))
        lengths.append(n)
    flush()
    return out


def _part_dir(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, "parts", f"p{i:05d}")


def read_part(out_dir: str, i: int, dim: int) -> tuple[list[dict], np.memmap, np.memmap, np.memmap]:
    """One part of a feature folder: its view rows and memory-mapped features, coords and kinds."""
    d = _part_dir(out_dir, i)
    with open(os.path.join(d, "index.json")) as fh:
        rows = json.load(fh)
    n = sum(r["n_tokens"] for r in rows)
    return (rows, np.memmap(os.path.join(d, "feats.f16"), np.float16, "r", shape=(n, dim)),
            np.memmap(os.path.join(d, "coords.i16"), np.int16, "r", shape=(n, 3)),
            np.memmap(os.path.join(d, "kinds.i8"), np.int8, "r", shape=(n,)))


def _check_or_write_meta(out_dir: str, meta: dict[str, Any]) -> None:
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        for key in ("format", "encoder_id", "cache_schema_hash", "policy_hash", "plan_hash", "readout_layers",
                    "histogram_bins", "context_radius"):
            if old.get(key) != meta.get(key):
                raise FeatureStoreError(f"{out_dir}: holds features with another {key} "
                                        f"({str(old.get(key))[:16]} vs {str(meta[key])[:16]}); "
                                        "use a new output folder")
        return
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class ViewFeatures:
    series_key: str
    study_key: str
    modality: str
    view: str
    feats: np.ndarray  # [n, dim] float16, memory-mapped
    coords: np.ndarray  # [n, 3] int16
    kinds: np.ndarray  # [n] int8


class FeatureStore:
    """Read side of a feature folder: memory-mapped, complete-or-error."""

    def __init__(self, out_dir: str):
        path = os.path.join(out_dir, "meta.json")
        if not os.path.isfile(path):
            raise FeatureStoreError(f"{out_dir}: not a feature folder (no meta.json; run `neurovfm embed`)")
        with open(path) as fh:
            self.meta = json.load(fh)
        if self.meta.get("format") != FORMAT or int(self.meta.get("format_version", 99)) > FORMAT_VERSION:
            raise FeatureStoreError(f"{path}: format {self.meta.get('format')!r} "
                                    f"v{self.meta.get('format_version')} is not readable by this code")
        self.root = out_dir
        self.dim = int(self.meta["dim"])
        self.readout_layers: list[int] | None = self.meta.get("readout_layers")  # None: the last block
        self.histogram_bins: int | None = self.meta.get("histogram_bins")  # embed --append-histogram
        self.context_radius: int | None = self.meta.get("context_radius")  # embed --append-context
        self.cross_series_mm: float | None = self.meta.get("cross_series_mm")  # add-context --cross-series
        missing = [i for i in range(self.meta["n_parts"]) if not os.path.isdir(_part_dir(out_dir, i))]
        if missing:
            raise FeatureStoreError(f"{out_dir}: incomplete, {len(missing)} of {self.meta['n_parts']} parts "
                                    f"missing (e.g. p{missing[0]:05d}); rerun `neurovfm embed` (it resumes)")
        self.views: list[ViewFeatures] = []
        for i in range(self.meta["n_parts"]):
            rows, f, c, kd = read_part(out_dir, i, self.dim)
            for r in rows:
                s, e = r["offset"], r["offset"] + r["n_tokens"]
                self.views.append(ViewFeatures(r["series_key"], r["study_key"], r["modality"], r["view"],
                                               f[s:e], c[s:e], kd[s:e]))
        self.by_study: dict[str, list[ViewFeatures]] = {}
        for v in self.views:
            self.by_study.setdefault(v.study_key, []).append(v)

    def head_features(self) -> dict[str, Any]:
        """What a head fitted on these features records (``analyze`` rebuilds the same features):
        the encoder, the blocks read, any appended histogram bins and, when used, the
        neighbourhood radius and the cross-series distance (absent otherwise, so older heads'
        records still compare equal)."""
        out = {"encoder_id": self.meta["encoder_id"], "readout_layers": self.readout_layers,
               "histogram_bins": self.histogram_bins}
        if self.context_radius:
            out["context_radius"] = self.context_radius
        if self.cross_series_mm:
            out["cross_series_mm"] = self.cross_series_mm
        return out

    def studies(self) -> list[str]:
        return sorted(self.by_study)

    def modality(self, study_key: str) -> str:
        return self.by_study[study_key][0].modality

    def bag_views(self, study_key: str, views: list[str] | None = None) -> list[ViewFeatures]:
        """The series views a study's bag is made of, in bag order (CT: only ``views`` if given)."""
        try:
            vs = self.by_study[study_key]
        except KeyError:
            raise FeatureStoreError(f"{self.root}: no features for study {study_key[:12]}…") from None
        if views is not None:
            vs = [v for v in vs if v.view in views or v.modality != "CT"]
        return vs

    def bag(self, study_key: str, views: list[str] | None = None, dtype=np.float32) -> np.ndarray:
        """Every token of every series (view) of a study, [n, dim]."""
        return np.concatenate([np.asarray(v.feats, dtype) for v in self.bag_views(study_key, views)])

    def bag_kinds(self, study_key: str, views: list[str] | None = None) -> np.ndarray:
        return np.concatenate([np.asarray(v.kinds) for v in self.bag_views(study_key, views)])


