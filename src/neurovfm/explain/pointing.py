"""The pointing game: does the head's map point at the lesion?

For every label with a lesion of at least ``min_size_mm`` in a study of the chosen split of a
synthetic archive (which has exact lesion masks on each series' own grid), the study goes through
``analyze``'s scoring path; the label's column of the head attention ranks every token of every
series. A *hit* is when the highest-scoring token overlaps a lesion of that label (any of them,
as in the standard pointing game: one map per label points at one place; ``pool_same_label=False``
scores each lesion on its own). Reported with two baselines a
map must beat: a uniform choice over foreground tokens (expected hit rate = share of tokens that
overlap the lesion), and the same for the share of map mass inside the lesion.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from neurovfm.analyze.config import AnalyzeConfig
from neurovfm.analyze.pipeline import Analyzer, read_study
from neurovfm.errors import NeuroVFMError
from neurovfm.eval.metrics import patient_weights
from neurovfm.tokens.cache import atomic_write_text


@dataclass
class PointingConfig:
    split: str = "test"
    min_size_mm: float = 10.0
    max_studies: int | None = None
    samples_per_axis: tuple[int, int, int] = (2, 4, 4)  # voxels sampled per token to test overlap
    bootstrap: int = 1000
    seed: int = 0
    # scored side by side from one encoding; "default": what analyze draws (each head's recorded map, else head)
    map_sources: tuple[str, ...] = ("default", "head", "contribution")
    # one trial per (study, label), hit on any lesion of that label (the standard pointing game: one
    # map per label can point at one place); False: one trial per lesion, as records before 2026-12-06
    pool_same_label: bool = True


def token_lesion_overlap(ts: Any, mask_img: nib.Nifti1Image, patch: tuple[int, int, int] = (4, 16, 16),
                         samples: tuple[int, int, int] = (2, 4, 4)) -> np.ndarray:
    """Per token of a tokenized series, the set of lesion labels it touches, as a boolean matrix
    [n_tokens, max_label + 1]: voxels sampled inside each token are taken to RAS through the
    canonical voxel affine and looked up (nearest) in the mask on its own grid."""
    mask = np.asanyarray(mask_img.dataobj).astype(np.int32)
    n_lab = int(mask.max()) + 1
    offs = np.stack(np.meshgrid(*[(np.arange(s) + 0.5) * p / s - 0.5 for s, p in zip(samples, patch)],
                                indexing="ij"), -1).reshape(-1, 3)
    vox = np.asarray(ts.coords, np.float64)[:, None, :] * np.array(patch) + offs[None]  # [n, S, 3]
    ras = vox @ ts.voxel_affine[:3, :3].T + ts.voxel_affine[:3, 3]
    inv = np.linalg.inv(mask_img.affine)
    ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(mask.shape)), axis=-1)
    lab = np.zeros(ijk.shape[:2], np.int32)
    lab[inside] = mask[ijk[inside][:, 0], ijk[inside][:, 1], ijk[inside][:, 2]]
    out = np.zeros((len(lab), n_lab), bool)
    rows = np.repeat(np.arange(len(lab)), lab.shape[1])
    out[rows, lab.ravel()] = True
    return out


DEFAULT_MAP = "default"  # a map source name for "the map analyze draws by default"
TIE_RTOL = 1e-9  # map values this close to the top one count as tied with it (sums over views differ in the last bits)


def pointing_hit(weights: np.ndarray, inside: np.ndarray) -> float:
    """The pointing game's hit for one finding: 1 when the map's highest token lies in the lesion.
    When several tokens tie for the highest value (a top-k head's map is flat over the tokens it
    picked), the share of them inside the lesion: the expected hit of a random tie-break, so the
    score never depends on token order. A map with no positive evidence (an all-zero contribution
    map) points at nothing: 0."""
    if weights.size == 0 or not weights.max() > 0:
        return 0.0
    top = weights >= weights.max() * (1 - TIE_RTOL)
    return float(inside[top].mean())


def pointing_trials(findings: list[dict[str, Any]], overlap: np.ndarray, labels: list[str],
                    min_size_mm: float, pool_same_label: bool = True) -> list[dict[str, Any]]:
    """The trials of one study: each a label, the tokens that count as a hit ([n_tokens] bool) and
    the lesion's size and side. A trial needs a lesion of at least ``min_size_mm`` whose label the
    head scores and that some foreground token overlaps. Pooled (the default), a label's trial
    counts a hit on any of its lesions in the study, smaller ones included; otherwise one trial
    per lesion of at least ``min_size_mm``."""
    n_lab = overlap.shape[1]
    known = [f for f in findings if f["label"] in labels and 0 < f["mask_index"] < n_lab]
    big = [f for f in known if f["size_mm"] >= min_size_mm]
    if pool_same_label:
        order = list(dict.fromkeys(f["label"] for f in big))
        groups = [([f for f in big if f["label"] == lab], [f for f in known if f["label"] == lab]) for lab in order]
    else:
        groups = [([f], [f]) for f in big]
    out = []
    for sized, every in groups:
        inside = overlap[:, [f["mask_index"] for f in every]].any(1)
        if not inside.any():
            continue  # lesion outside every series' foreground tokens (e.g. in the scalp)
        sides = sorted({f["side"] for f in sized})
        out.append({"label": sized[0]["label"], "inside": inside, "size_mm": max(f["size_mm"] for f in sized),
                    "side": sides[0] if len(sides) == 1 else "+".join(sides), "n_lesions": len(every)})
    return out


def read_masked_study(archive: str, record: dict[str, Any], cfg: AnalyzeConfig,
                      samples: tuple[int, int, int] = (2, 4, 4)) -> tuple[list, np.ndarray]:
    """One study of a synthetic archive as ``analyze`` reads it: its series (named s00, s01, ...;
    a path that does not read as exactly one series is skipped) and, row-aligned with their tokens
    concatenated, which lesion labels each token touches ([n_tokens, max_label + 1] bool)."""
    group, overlaps = [], []
    for s in record["series"]:
        series, _ = read_study(os.path.join(archive, s["path"]), cfg)
        if len(series) != 1:
            continue
        group.append(series[0])
        overlaps.append(token_lesion_overlap(series[0].ts, nib.load(os.path.join(archive, s["mask"])), samples=samples))
    for i, s in enumerate(group):
        s.name = f"s{i:02d}"
    if not group:
        return group, np.zeros((0, 1), bool)
    n_lab = max(o.shape[1] for o in overlaps)
    return group, np.concatenate([np.pad(o, ((0, 0), (0, n_lab - o.shape[1]))) for o in overlaps])


def run_pointing(archive: str, model: str, out: str, cfg: PointingConfig | None = None,
                 progress: bool = True) -> dict[str, Any]:
    cfg = cfg or PointingConfig()
    rec_path = os.path.join(archive, "records.jsonl")
    if not os.path.isfile(rec_path):
        raise NeuroVFMError(f"{archive}: not a synthetic archive (no records.jsonl with lesion masks)")
    with open(rec_path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    an = Analyzer(model, AnalyzeConfig(maps="none"))
    for src in cfg.map_sources:
        an.check_map_source(None if src == DEFAULT_MAP else src)
    todo = [r for r in records if r["split"] == cfg.split and r["modality"] in an.heads
            and any(f["size_mm"] >= cfg.min_size_mm and f["label"] in an.heads[r["modality"]][1]["labels"]
                    for f in r["findings"])]
    if cfg.max_studies:
        todo = todo[: cfg.max_studies]
    rows: list[dict[str, Any]] = []
    for r in tqdm(todo, desc="pointing", unit="study", disable=not progress, file=sys.stderr):
        group, ov = read_masked_study(archive, r, an.cfg, cfg.samples_per_axis)
        if not group:
            continue
        scores = {}
        for src in cfg.map_sources:
            first = next(iter(scores.values()), None)
            scores[src] = an.score(r["modality"], group, map_source=None if src == DEFAULT_MAP else src,
                                   view_features=first.view_features if first else None)
        sc = scores[cfg.map_sources[0]]
        for trial in pointing_trials(r["findings"], ov, sc.labels, cfg.min_size_mm, cfg.pool_same_label):
            hit_tokens = trial["inside"]
            j = sc.labels.index(trial["label"])
            row = {"patient": r["patient"], "modality": r["modality"], "label": trial["label"],
                   "size_mm": trial["size_mm"], "side": trial["side"], "n_lesions": trial["n_lesions"],
                   "uniform_hit": float(hit_tokens.mean()), "calibrated_probability": float(sc.p_cal[j])}
            if DEFAULT_MAP in scores:
                row["default_map"] = scores[DEFAULT_MAP].map_source
            for src, scs in scores.items():
                w = np.concatenate([pw[:, j] for pw in scs.per_series_w])
                row[f"hit_{src}"] = pointing_hit(w, hit_tokens)
                row[f"mass_inside_{src}"] = float(w[hit_tokens].sum() / w.sum()) if w.sum() > 0 else 0.0
            rows.append(row)
    per_source = {src: summarize([{**r, "hit": r[f"hit_{src}"], "mass_inside": r[f"mass_inside_{src}"]}
                                  for r in rows], cfg) for src in cfg.map_sources}
    summary = per_source[cfg.map_sources[0]]
    os.makedirs(out, exist_ok=True)
    res = {"config": asdict(cfg), "model": an.model_info, "summary": summary, "by_map_source": per_source,
           "findings": rows}
    atomic_write_text(os.path.join(out, "pointing.json"), json.dumps(res, indent=1))
    return res


def summarize(rows: list[dict[str, Any]], cfg: PointingConfig) -> dict[str, Any]:
    if not rows:
        return {"n_findings": 0}
    hit = np.array([r["hit"] for r in rows], float)
    uni = np.array([r["uniform_hit"] for r in rows])
    mass = np.array([r["mass_inside"] for r in rows])
    pats = np.array([r["patient"] for r in rows])
    # patient bootstrap of (hit rate - uniform expectation), the evaluation's resampler
    w = patient_weights(pats, cfg.bootstrap, cfg.seed)
    diffs = (w @ hit - w @ uni) / w.sum(1)
    by_label: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_label[f"{r['modality']}:{r['label']}"].append(float(r["hit"]))
    mods = np.array([r["modality"] for r in rows])
    by_modality = {m: {"n_findings": int((mods == m).sum()), "n_patients": int(len(np.unique(pats[mods == m]))),
                       "hit_rate": float(hit[mods == m].mean()), "uniform_hit_rate": float(uni[mods == m].mean()),
                       "mass_inside_lesion": float(mass[mods == m].mean())} for m in sorted(set(mods))}
    return {"n_findings": len(rows), "n_patients": int(len(np.unique(pats))), "hit_rate": float(hit.mean()),
            "uniform_hit_rate": float(uni.mean()),
            "hit_minus_uniform_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "mass_inside_lesion": float(mass.mean()), "uniform_mass_inside_lesion": float(uni.mean()),
            "by_modality": by_modality,
            "by_label": {k: {"n": len(v), "hit_rate": float(np.mean(v))} for k, v in sorted(by_label.items())}}
