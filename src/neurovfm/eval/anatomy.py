"""Anatomy probe: does a frozen token feature know which structure its token covers?

The paper reports that its tokens encode anatomy. Here that is measured, not assumed: every
synthetic study has a per-subject anatomical label map in scanner space
(:mod:`neurovfm.synth.atlas_maps`: AAL3 regions grouped by lobe and side, white matter by side,
ventricles, CSF, bone, soft tissue). A token's class is the map's label at the token centre
(through the cache's token-grid affine). A multinomial linear probe on the token features is
fitted on the train split's studies (its L2 chosen on validation), and scored once on the test
split: accuracy and balanced accuracy (mean per-class recall), with patient-bootstrap intervals,
and paired differences against the first feature set on the *same* tokens.

Two references come with every run: chance (one over the number of classes for balanced
accuracy) and ``position``, the same probe on the token's position relative to its series'
foreground centre (quadratic terms included), since every ViT feature carries its position code
and the heads are roughly aligned: a feature set only shows anatomy beyond position if it
beats that row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch

from neurovfm.errors import NeuroVFMError
from neurovfm.eval.metrics import _interval, patient_weights
from neurovfm.eval.standardize import fit_standardization, standardize
from neurovfm.explain.maps import token_centres_ras
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import FeatureStore
from neurovfm.synth.atlas_maps import read_legend
from neurovfm.tokens.cache import TokenCache, atomic_write_text

POSITION = "position"


class AnatomyProbeError(NeuroVFMError):
    """The archive has no anatomy maps, or the features do not join it."""


@dataclass
class AnatomyProbeConfig:
    tokens_per_view: int = 48  # sampled per series view (the same tokens for every feature set)
    ct_views: list[str] = field(default_factory=lambda: ["brain"])  # one CT window: its tokens are the others'
    min_train_tokens: int = 40  # classes rarer than this in the train split are left out
    l2_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    steps: int = 200  # L-BFGS iterations
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens_per_view < 1:
            raise ValueError("tokens_per_view must be >= 1")
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError("l2_grid must hold non-negative values")


# -- which tokens, and their classes -------------------------------------------------------------------
@dataclass
class StudyTruth:
    study_key: str
    patient_key: str
    split: str
    modality: str
    anatomy: str  # path of the study's map


def read_truth(archive: str, keyer: Keyer) -> tuple[dict[str, StudyTruth], list[str]]:
    """study key -> where its anatomy map is; and the class names (sorted)."""
    legend_path = os.path.join(archive, "tables", "anatomy_labels.csv")
    rec_path = os.path.join(archive, "findings.jsonl")
    if not os.path.isfile(rec_path):
        raise AnatomyProbeError(f"{archive}: not a synthetic archive (no findings.jsonl)")
    if not os.path.isfile(legend_path):
        raise AnatomyProbeError(f"{archive}: no anatomy maps (tables/anatomy_labels.csv missing); add them with "
                                f"`neurovfm synth {archive} --studies N --seed S --anatomy-only`")
    classes = sorted({cls for _, cls in read_legend(legend_path).values()})
    out = {}
    with open(rec_path) as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            path = os.path.join(archive, "anatomy", f"{r['study_uid']}.nii.gz")
            if not os.path.isfile(path):
                raise AnatomyProbeError(f"{path}: anatomy map missing; add it with `neurovfm synth ... --anatomy-only`")
            k = keyer.study(r["study_uid"])
            out[k] = StudyTruth(k, keyer.patient(r["patient_id"]), r["split"], r["modality"], path)
    return out, classes


def _token_sample(series_key: str, view: str, n_tokens: int, k: int, seed: int) -> np.ndarray:
    """The same token indices for a series view whatever the features (seeded by its key)."""
    h = int.from_bytes(hashlib.sha256(f"{series_key}/{view}".encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, h])
    return np.sort(rng.choice(n_tokens, size=min(k, n_tokens), replace=False))


@dataclass
class TokenSet:
    """Sampled tokens of one modality: class, study, patient, split, position features, and where
    each token sits in the feature store (view index, row)."""

    y: np.ndarray
    study: np.ndarray
    patient: np.ndarray
    split: np.ndarray
    position: np.ndarray
    where: list[tuple[str, str, np.ndarray]]  # (series key, view, rows) in sampling order


def position_features(ras: np.ndarray) -> np.ndarray:
    """[n, 9] a token's position relative to its series' foreground centre (mean of ``ras``) with
    quadratic and cross terms: the ``position`` reference of the token probes."""
    rel = ras - ras.mean(0)
    return np.hstack([rel, rel ** 2 / 100.0, rel[:, [0, 0, 1]] * rel[:, [1, 2, 2]] / 100.0])


def class_lookup(legend: dict[int, tuple[str, str]], classes: list[str]) -> np.ndarray:
    """code -> class index (-1 for codes without a class, e.g. 0 = outside)."""
    cls_index = {c: i for i, c in enumerate(classes)}
    code_to_class = np.full(max(legend) + 1, -1, np.int64)
    for code, (_, cls) in legend.items():
        code_to_class[code] = cls_index[cls]
    return code_to_class


def token_codes(grid_affine: np.ndarray, coords: np.ndarray, anatomy: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Token centres (RAS mm) and the anatomy map's code at each (nearest voxel; 0 outside the map)."""
    amap = np.asanyarray(anatomy.dataobj)
    inv = np.linalg.inv(anatomy.affine)
    ras = token_centres_ras(grid_affine, np.asarray(coords))
    ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.array(amap.shape)), axis=1)
    code = np.zeros(len(ras), np.int64)
    code[ok] = amap[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]]
    return ras, code


def sample_tokens(store: FeatureStore, cache: TokenCache, truth: dict[str, StudyTruth], classes: list[str],
                  modality: str, cfg: AnatomyProbeConfig, legend: dict[int, tuple[str, str]]) -> TokenSet:
    code_to_class = class_lookup(legend, classes)
    ys, studies, patients, splits, pos, where = [], [], [], [], [], []
    for sk in store.studies():
        if sk not in truth or truth[sk].modality != modality:
            continue
        t = truth[sk]
        img = nib.load(t.anatomy)
        for v in store.by_study[sk]:
            if v.modality == "CT" and v.view not in cfg.ct_views:
                continue
            try:
                entry = cache.get(v.series_key)
            except KeyError:
                raise AnatomyProbeError(f"{store.root}: series {v.series_key[:12]}… is not in the cache "
                                        f"{cache.root}; give the cache these features were embedded from") from None
            ras, code = token_codes(entry.grid_affine_array, v.coords, img)
            cls = np.where(code > 0, code_to_class[np.clip(code, 0, len(code_to_class) - 1)], -1)
            inside = np.flatnonzero(cls >= 0)
            if not len(inside):
                continue
            rows = inside[_token_sample(v.series_key, v.view, len(inside), cfg.tokens_per_view, cfg.seed)]
            pos.append(position_features(ras)[rows])
            ys.append(cls[rows])
            studies += [sk] * len(rows)
            patients += [t.patient_key] * len(rows)
            splits += [t.split] * len(rows)
            where.append((v.series_key, v.view, rows))
    if not ys:
        return TokenSet(np.zeros(0, np.int64), np.array([]), np.array([]), np.array([]), np.zeros((0, 9)), [])
    return TokenSet(np.concatenate(ys), np.array(studies), np.array(patients), np.array(splits),
                    np.concatenate(pos).astype(np.float32), where)


def gather_features(store: FeatureStore, ts: TokenSet) -> np.ndarray:
    """The sampled tokens' features from ``store``, in ``ts`` order (float32)."""
    views = {(v.series_key, v.view): v for v in store.views}
    parts = []
    for sk, view, rows in ts.where:
        v = views.get((sk, view))
        if v is None:
            raise AnatomyProbeError(f"{store.root}: no features for series {sk[:12]}… view {view}; "
                                    "compare feature sets embedded from the same cache")
        parts.append(np.asarray(v.feats[rows], np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)


# -- the probe ------------------------------------------------------------------------------------------
def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, steps: int) -> tuple[np.ndarray, ...]:
    """Multinomial logistic regression on standardised features (L2 on weights, not biases), full
    batch L-BFGS in float64: deterministic. Returns (mean, scale, W, b)."""
    mean, scale = fit_standardization(x)
    X = torch.from_numpy(standardize(x, mean, scale)).double()
    Y = torch.from_numpy(y.astype(np.int64))
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, Y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, scale, W.detach().numpy(), b.detach().numpy()


def predict(params: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    mean, scale, W, b = params
    return np.argmax(standardize(x, mean, scale) @ W + b, axis=1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    rec = [np.mean(pred[y == c] == c) for c in range(n_classes) if np.any(y == c)]
    return float(np.mean(rec)) if rec else float("nan")


def _per_study_counts(y, pred, study, n_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per test study: tokens per class and correct tokens per class ([S, C] each)."""
    keys, inv = np.unique(study, return_inverse=True)
    total = np.zeros((len(keys), n_classes))
    correct = np.zeros((len(keys), n_classes))
    np.add.at(total, (inv, y), 1.0)
    np.add.at(correct, (inv, y), (pred == y).astype(float))
    return keys, total, correct


def _bootstrap(total: np.ndarray, correct: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and balanced accuracy under each resample ``w`` [B, S]."""
    t, c = w @ total, w @ correct  # [B, C]
    acc = c.sum(1) / np.maximum(t.sum(1), 1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = np.where(t > 0, c / t, np.nan)
    return {"accuracy": acc, "balanced_accuracy": np.nanmean(rec, axis=1)}


def probe_one(x: np.ndarray, ts: TokenSet, keep: np.ndarray, n_classes: int, cfg: AnatomyProbeConfig
              ) -> dict[str, Any]:
    tr, va, te = (keep & (ts.split == s) for s in ("train", "val", "test"))
    best = None
    for l2 in cfg.l2_grid:
        params = fit_softmax(x[tr], ts.y[tr], n_classes, l2, cfg.steps)
        score = balanced_accuracy(ts.y[va], predict(params, x[va]), n_classes) if va.any() else 0.0
        if best is None or score > best[0]:
            best = (score, l2, params)
    _, l2, params = best
    pred = predict(params, x[te])
    return {"l2": l2, "val_balanced_accuracy": best[0], "pred": pred,
            "accuracy": float(np.mean(pred == ts.y[te])),
            "balanced_accuracy": balanced_accuracy(ts.y[te], pred, n_classes),
            "recall": {c: float(np.mean(pred[ts.y[te] == c] == c)) for c in range(n_classes) if np.any(ts.y[te] == c)}}


def anatomy_probe(features: dict[str, str], archive: str, cache_dir: str, out_dir: str | None = None,
                  cfg: AnatomyProbeConfig | None = None, keyer: Keyer | None = None) -> dict[str, Any]:
    """Probe every feature set (and token position) for the anatomy classes, CT and MRI apart."""
    cfg = cfg or AnatomyProbeConfig()
    keyer = keyer or Keyer.from_site()
    truth, classes = read_truth(archive, keyer)
    legend = read_legend(os.path.join(archive, "tables", "anatomy_labels.csv"))
    stores = {name: FeatureStore(path) for name, path in features.items()}
    if POSITION in stores:
        raise AnatomyProbeError(f"--features: {POSITION!r} is the name of the built-in position reference")
    first = next(iter(stores.values()))
    joined = [k for k in first.studies() if k in truth]
    if not joined:
        raise AnatomyProbeError(f"{first.root}: none of its studies is in {archive} under this site secret "
                                "(NEUROVFM_SITE_SECRET must be the one the cache was ingested with)")
    cache = TokenCache(cache_dir)
    summary: dict[str, Any] = {"config": asdict(cfg), "classes": classes, "features": dict(features), "modalities": {}}
    try:
        for mod in ("CT", "MR"):
            ts = sample_tokens(first, cache, truth, classes, mod, cfg, legend)
            if not len(ts.y) or not np.any(ts.split == "test") or not np.any(ts.split == "train"):
                continue
            counts = np.bincount(ts.y[ts.split == "train"], minlength=len(classes))
            kept = [c for c in range(len(classes)) if counts[c] >= cfg.min_train_tokens]
            remap = np.full(len(classes), -1)
            remap[kept] = np.arange(len(kept))
            ts.y = remap[ts.y]
            keep = ts.y >= 0
            n_cls = len(kept)
            te = keep & (ts.split == "test")
            if n_cls < 2 or not te.any():
                continue
            st_keys, st_inv = np.unique(ts.study[te], return_index=True)
            w = patient_weights(ts.patient[te][st_inv], cfg.bootstrap, cfg.seed)
            rows: dict[str, Any] = {}
            preds: dict[str, np.ndarray] = {}
            sets = {POSITION: ts.position, **{n: gather_features(s, ts) for n, s in stores.items()}}
            for name, x in sets.items():
                r = probe_one(x, ts, keep, n_cls, cfg)
                preds[name] = r.pop("pred")
                _, total, correct = _per_study_counts(ts.y[te], preds[name], ts.study[te], n_cls)
                boot = _bootstrap(total, correct, w)
                r["accuracy"] = _interval(r["accuracy"], boot["accuracy"], 0.05)
                r["balanced_accuracy"] = _interval(r["balanced_accuracy"], boot["balanced_accuracy"], 0.05)
                r["recall"] = {classes[kept[c]]: v for c, v in r["recall"].items()}
                r["_boot"] = boot
                rows[name] = r
            ref = next(iter(stores))  # paired differences against the first named feature set
            for name, r in rows.items():
                if name == ref:
                    continue
                d = rows[ref]["_boot"]["balanced_accuracy"] - r["_boot"]["balanced_accuracy"]
                est = rows[ref]["balanced_accuracy"]["estimate"] - r["balanced_accuracy"]["estimate"]
                r[f"{ref}_minus_this_balanced_accuracy"] = _interval(est, d, 0.05)
            for r in rows.values():
                r.pop("_boot")
            summary["modalities"][mod] = {
                "classes": [classes[c] for c in kept], "chance_balanced_accuracy": 1.0 / n_cls,
                "majority_accuracy": float(np.bincount(ts.y[te], minlength=n_cls).max() / max(te.sum(), 1)),
                "tokens": {s: int((keep & (ts.split == s)).sum()) for s in ("train", "val", "test")},
                "test_studies": int(len(st_keys)), "test_patients": int(len(np.unique(ts.patient[te]))),
                "results": rows}
    finally:
        cache.close()
    if not summary["modalities"]:
        raise AnatomyProbeError("no modality had train and test tokens inside the anatomy maps")
    if out_dir:
        write_outputs(out_dir, summary)
    return summary


# -- outputs ---------------------------------------------------------------------------------------------
def csv_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for mod, m in summary["modalities"].items():
        for name, r in m["results"].items():
            ba, acc = r["balanced_accuracy"], r["accuracy"]
            rows.append({"modality": mod, "features": name, "classes": len(m["classes"]),
                         "balanced_accuracy": round(ba["estimate"], 4), "ba_low": round(ba["low"], 4),
                         "ba_high": round(ba["high"], 4), "accuracy": round(acc["estimate"], 4),
                         "chance_balanced_accuracy": round(m["chance_balanced_accuracy"], 4), "l2": r["l2"]})
    return rows


def write_outputs(out_dir: str, summary: dict[str, Any]) -> list[str]:
    from neurovfm.eval.experiment import _default, _write_csv

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "anatomy.json"), os.path.join(out_dir, "anatomy.csv")]
    atomic_write_text(paths[0], json.dumps(summary, indent=1, default=_default))
    _write_csv(paths[1], csv_rows(summary))
    paths.append(plot(summary, os.path.join(out_dir, "anatomy.png")))
    return paths


def plot(summary: dict[str, Any], path: str) -> str:
    from neurovfm.eval.plots import _finish, _plt

    plt = _plt()
    mods = list(summary["modalities"])
    fig, axes = plt.subplots(1, len(mods), figsize=(5 * len(mods), 3.6), squeeze=False)
    for ax, mod in zip(axes.flat, mods):
        m = summary["modalities"][mod]
        names = list(m["results"])
        est = [m["results"][n]["balanced_accuracy"]["estimate"] for n in names]
        lo = [max(e - m["results"][n]["balanced_accuracy"]["low"], 0.0) for e, n in zip(est, names)]
        hi = [max(m["results"][n]["balanced_accuracy"]["high"] - e, 0.0) for e, n in zip(est, names)]
        ax.bar(range(len(names)), est, yerr=[lo, hi], color=["0.6" if n == POSITION else "C0" for n in names], capsize=3)
        ax.axhline(m["chance_balanced_accuracy"], color="r", ls="--", lw=1, label="chance")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test balanced accuracy")
        ax.set_title(f"{mod}: {len(m['classes'])} anatomy classes, {m['test_studies']} test studies")
        ax.legend(loc="upper right", fontsize=8)
    return _finish(plt, fig, axes, len(mods), path, "Anatomy probe: token features -> structure (95 % patient bootstrap)")


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'modality':8s} {'features':14s} {'bal. acc [95% CI]':26s} {'accuracy':9s} chance"]
    for r in csv_rows(summary):
        lines.append(f"{r['modality']:8s} {r['features']:14s} {r['balanced_accuracy']:.3f} [{r['ba_low']:.3f}, "
                     f"{r['ba_high']:.3f}]      {r['accuracy']:.3f}     {r['chance_balanced_accuracy']:.3f}")
    return "\n".join(lines)
