"""Lesion probe: do frozen token features know *where* a lesion is?

The pointing game asks a weakly supervised head to find lesions from study labels alone. When it
fails, two explanations differ in what to fix: the features carry no lesion signal at all (fix
the encoder), or they do and a few hundred studies of study-level labels cannot teach a head to
find it (fix the head, or get more labels). This probe separates them with the strongest cheap
readout there is: a token-level linear probe *given the lesion masks*.

Every series of a synthetic archive has exact lesion masks on its own grid. A token is a lesion
token when the mask is non-zero at its centre (through the cache's token-grid affine). An L2
logistic probe on the token features (CT: the series' windows side by side) is fitted on the
train split's lesion tokens and a seeded sample of its other tokens (strength chosen on
validation) and scored once on the test split:

* token AUROC, lesion vs other tokens (all test lesion tokens and the same sampling of the
  rest), with a patient-bootstrap interval and paired differences against the first feature set;
* probe pointing: for each test study with a finding of at least ``min_size_mm``, does the
  study's highest-scoring token lie in a lesion? Beside it, the uniform expectation (the share of
  the study's tokens in a lesion): the same hit rule as the pointing game, with mask supervision,
  so it bounds what a linear map on these features could do.

A ``position`` row (the probe on the token's position relative to its series' foreground
centre) says how much a location prior alone explains.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from neurovfm.errors import NeuroVFMError
from neurovfm.eval import metrics as M
from neurovfm.eval.anatomy import _token_sample, position_features, token_codes
from neurovfm.eval.shortcut import L2_GRID, LogisticProbe
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import FeatureStore
from neurovfm.synth.rekey import series_identity
from neurovfm.tokens.cache import TokenCache, atomic_write_text

POSITION = "position"


class LesionProbeError(NeuroVFMError):
    """The archive has no lesion masks, or the features do not join it."""


@dataclass
class LesionProbeConfig:
    negatives_per_series: int = 64  # non-lesion tokens sampled per series (the same for every feature set)
    min_size_mm: float = 10.0  # findings that make a study count for probe pointing (as the pointing game)
    ct_views: list[str] = field(default_factory=lambda: ["brain", "blood", "bone"])  # side by side per token
    l2_grid: list[float] = field(default_factory=lambda: list(L2_GRID))
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.negatives_per_series < 1:
            raise ValueError("negatives_per_series must be >= 1")
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError("l2_grid must hold non-negative values")


@dataclass
class SeriesTruth:
    study_key: str
    patient_key: str
    split: str
    modality: str
    mask: str  # path of the series' lesion mask (its own grid)
    big_lesion: bool  # the study has a finding >= min_size_mm


def read_lesion_truth(archive: str, keyer: Keyer, min_size_mm: float) -> dict[str, SeriesTruth]:
    """series key -> its study's keys, split and lesion mask."""
    path = os.path.join(archive, "records.jsonl")
    if not os.path.isfile(path):
        raise LesionProbeError(f"{archive}: not a synthetic archive (no records.jsonl with lesion masks)")
    out = {}
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            big = any(f.get("size_mm", 0) >= min_size_mm for f in r["findings"])
            for s in r["series"]:
                m = os.path.join(archive, s["mask"])
                if not os.path.isfile(m):
                    raise LesionProbeError(f"{m}: lesion mask missing")
                k = keyer.series(series_identity(r["study_uid"], s["series_uid"]))
                out[k] = SeriesTruth(keyer.study(r["study_uid"]), keyer.patient(r["patient_id"]), r["split"],
                                     r["modality"], m, big)
    return out


@dataclass
class SeriesTokens:
    """One series of the probe: where its tokens are in each feature store, their lesion flag,
    position features, and which rows enter the fit / token AUROC."""

    series_key: str
    truth: SeriesTruth
    views: list[str]
    lesion: np.ndarray  # [n] bool
    position: np.ndarray  # [n, 9]
    sampled: np.ndarray  # rows: every lesion token + a seeded sample of the others


def plan_series(store: FeatureStore, cache: TokenCache, truth: dict[str, SeriesTruth], modality: str,
                cfg: LesionProbeConfig) -> list[SeriesTokens]:
    by_series: dict[str, dict[str, Any]] = defaultdict(dict)
    for v in store.views:
        if v.series_key in truth and truth[v.series_key].modality == modality:
            by_series[v.series_key][v.view] = v
    out = []
    for sk in sorted(by_series):
        views = by_series[sk]
        names = [w for w in cfg.ct_views if w in views] if modality == "CT" else sorted(views)
        if not names or (modality == "CT" and len(names) != len(cfg.ct_views)):
            continue
        v0 = views[names[0]]
        try:
            entry = cache.get(sk)
        except KeyError:
            raise LesionProbeError(f"{store.root}: series {sk[:12]}… is not in the cache {cache.root}; give the "
                                   "cache these features were embedded from") from None
        ras, code = token_codes(entry.grid_affine_array, v0.coords, nib.load(truth[sk].mask))
        lesion = code > 0
        others = np.flatnonzero(~lesion)
        sampled = others[_token_sample(sk, "negatives", len(others), cfg.negatives_per_series, cfg.seed)]
        rows = np.union1d(np.flatnonzero(lesion), sampled)
        out.append(SeriesTokens(sk, truth[sk], names, lesion, position_features(ras).astype(np.float32), rows))
    return out


def series_features(store: FeatureStore, st: SeriesTokens) -> np.ndarray:
    """[n, d x views] the series' token features, its views side by side (float32)."""
    views = {(v.series_key, v.view): v for v in store.by_study.get(st.truth.study_key, [])}
    parts = []
    for w in st.views:
        v = views.get((st.series_key, w))
        if v is None:
            raise LesionProbeError(f"{store.root}: no features for series {st.series_key[:12]}… view {w}; "
                                   "compare feature sets embedded from the same cache")
        parts.append(np.asarray(v.feats, np.float32))
    return np.hstack(parts)


def probe_feature_set(series: list[SeriesTokens], feats: list[np.ndarray], cfg: LesionProbeConfig) -> dict[str, Any]:
    """Fit on train (L2 on validation), score test: token scores on the sampled rows, and every
    test token's score for pointing."""
    def stack(split: str):
        idx = [i for i, s in enumerate(series) if s.truth.split == split]
        if not idx:
            return np.zeros((0, feats[0].shape[1] if feats else 0)), np.zeros(0)
        x = np.concatenate([feats[i][series[i].sampled] for i in idx])
        y = np.concatenate([series[i].lesion[series[i].sampled] for i in idx]).astype(np.float64)
        return x, y

    x_tr, y_tr = stack("train")
    x_va, y_va = stack("val")
    if not 0 < y_tr.sum() < len(y_tr):
        raise LesionProbeError("no lesion tokens (or only lesion tokens) in the train split")
    l2 = cfg.l2_grid[0]
    if len(cfg.l2_grid) > 1 and 0 < y_va.sum() < len(y_va):
        scores = [M.auroc(y_va, LogisticProbe(c).fit(x_tr, y_tr).decision(x_va)) for c in cfg.l2_grid]
        l2 = cfg.l2_grid[int(np.nanargmax(scores))]
    probe = LogisticProbe(l2).fit(x_tr, y_tr)
    test = {i: probe.decision(feats[i]) for i, s in enumerate(series) if s.truth.split == "test"}
    return {"l2": l2, "train_tokens": int(len(y_tr)), "train_lesion_tokens": int(y_tr.sum()), "test_scores": test}


def _pointing(series: list[SeriesTokens], scores: dict[int, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per test study with a big finding: hit (top token in a lesion) and the uniform expectation."""
    by_study: dict[str, list[int]] = defaultdict(list)
    for i in scores:
        if series[i].truth.big_lesion:
            by_study[series[i].truth.study_key].append(i)
    out = {}
    for sk, idx in sorted(by_study.items()):
        les = np.concatenate([series[i].lesion for i in idx])
        if not les.any():
            continue  # the lesion lies outside every series' foreground tokens
        sc = np.concatenate([scores[i] for i in idx])
        out[sk] = {"hit": float(les[int(np.argmax(sc))]), "uniform": float(les.mean()),
                   "patient": series[idx[0]].truth.patient_key}
    return out


def lesion_probe(features: dict[str, str], archive: str, cache_dir: str, out_dir: str | None = None,
                 cfg: LesionProbeConfig | None = None, keyer: Keyer | None = None) -> dict[str, Any]:
    """Probe every feature set (and token position) for lesion tokens, CT and MRI apart."""
    cfg = cfg or LesionProbeConfig()
    keyer = keyer or Keyer.from_site()
    truth = read_lesion_truth(archive, keyer, cfg.min_size_mm)
    stores = {name: FeatureStore(path) for name, path in features.items()}
    if POSITION in stores:
        raise LesionProbeError(f"--features: {POSITION!r} is the name of the built-in position reference")
    first = next(iter(stores.values()))
    if not any(v.series_key in truth for v in first.views):
        raise LesionProbeError(f"{first.root}: none of its series is in {archive} under this site secret "
                               "(NEUROVFM_SITE_SECRET must be the one the cache was ingested with)")
    cache = TokenCache(cache_dir)
    summary: dict[str, Any] = {"config": asdict(cfg), "features": dict(features), "modalities": {}}
    try:
        for mod in ("CT", "MR"):
            series = plan_series(first, cache, truth, mod, cfg)
            te = [i for i, s in enumerate(series) if s.truth.split == "test"]
            if not te or not any(s.truth.split == "train" for s in series):
                continue
            y_te = np.concatenate([series[i].lesion[series[i].sampled] for i in te]).astype(np.float64)
            pat_te = np.concatenate([[series[i].truth.patient_key] * len(series[i].sampled) for i in te])
            if not 0 < y_te.sum() < len(y_te):
                continue
            w = M.patient_weights(pat_te, cfg.bootstrap, cfg.seed)
            sets = {POSITION: [s.position for s in series]}
            for name, store in stores.items():
                sets[name] = [series_features(store, s) for s in series]
            rows: dict[str, Any] = {}
            boot: dict[str, np.ndarray] = {}
            point_boot: dict[str, np.ndarray] = {}
            for name, feats in sets.items():
                fit = probe_feature_set(series, feats, cfg)
                s_te = np.concatenate([fit["test_scores"][i][series[i].sampled] for i in te])
                boot[name] = M.weighted_auroc(y_te, s_te, w)
                pts = _pointing(series, fit["test_scores"])
                hits = np.array([p["hit"] for p in pts.values()])
                uni = np.array([p["uniform"] for p in pts.values()])
                pw = M.patient_weights([p["patient"] for p in pts.values()], cfg.bootstrap, cfg.seed) if pts else None
                point_boot[name] = (pw @ hits / pw.sum(1)) if pts else np.zeros(0)
                rows[name] = {"l2": fit["l2"], "train_tokens": fit["train_tokens"],
                              "train_lesion_tokens": fit["train_lesion_tokens"],
                              "token_auroc": M._interval(M.auroc(y_te, s_te), boot[name], 0.05),
                              "pointing_hit_rate": M._interval(float(hits.mean()) if len(hits) else float("nan"),
                                                               point_boot[name], 0.05),
                              "pointing_uniform": float(uni.mean()) if len(uni) else float("nan"),
                              "pointing_studies": int(len(hits))}
            ref = next(iter(stores))
            for name, r in rows.items():
                if name != ref:
                    est = rows[ref]["token_auroc"]["estimate"] - r["token_auroc"]["estimate"]
                    r[f"{ref}_minus_this_token_auroc"] = M._interval(est, boot[ref] - boot[name], 0.05)
            summary["modalities"][mod] = {
                "series": {s: sum(1 for x in series if x.truth.split == s) for s in ("train", "val", "test")},
                "test_tokens": int(len(y_te)), "test_lesion_tokens": int(y_te.sum()),
                "test_patients": int(len(np.unique(pat_te))), "results": rows}
    finally:
        cache.close()
    if not summary["modalities"]:
        raise LesionProbeError("no modality had train and test series with lesion tokens")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "lesion_probe.json"), json.dumps(summary, indent=1))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = []
    for mod, m in summary["modalities"].items():
        lines.append(f"{mod}: {m['test_lesion_tokens']} lesion / {m['test_tokens']} sampled test tokens, "
                     f"{m['test_patients']} patients")
        for name, r in m["results"].items():
            a, p = r["token_auroc"], r["pointing_hit_rate"]
            lines.append(f"  {name:>14s}  token AUROC {a['estimate']:.3f} [{a['low']:.3f}, {a['high']:.3f}]   "
                         f"pointing {p['estimate']:.3f} [{p['low']:.3f}, {p['high']:.3f}] vs uniform "
                         f"{r['pointing_uniform']:.3f} ({r['pointing_studies']} studies)")
    return "\n".join(lines)
