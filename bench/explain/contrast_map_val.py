"""A class-discriminative token map, checked on the VALIDATION split before it is built into the package.

    NEUROVFM_SITE_SECRET=... python bench/explain/contrast_map_val.py ARCHIVE MODEL FEATS CACHE KEYED_LABELS \
        --out RESULT.json [--split val] [--dump DUMP.npz]

Why: on validation, the head maps of chronic stroke and gliosis mostly land on *another* lesion of the
study (a glioma, the ventricles of hydrocephalus, a resection cavity): their token classifiers learnt
"lesion" more than "this finding". The candidate map for label c is each token's logit for c minus its
highest logit among c's rivals,

    contrast_c(t) = z_c(t) - max_{c' in rivals(c)} z_c'(t)      (z = heads.token_logits)

with rivals(c) = the labels that have lesion tokens in the TRAINING split's token targets
(``probe.token_targets``, the same masks the heads were fitted with) and never share a lesion token
with c (labels of one lesion, such as glioma / brain tumour / oedema, do not compete). Hits are
counted per lesion (>= 10 mm, ties shared, as ``neurovfm pointing --per-lesion``) for the head's own
map (what ``analyze`` draws), the token logits (summed over a CT token's windows; not ``--map-source
token``, which sums probabilities) and the contrast map, per modality.
The dump of per-series token logits (the encoder run, minutes) is kept with ``--dump`` for reruns.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

from neurovfm.analyze.config import AnalyzeConfig
from neurovfm.analyze.pipeline import Analyzer, exam_views
from neurovfm.explain.pointing import pointing_hit, pointing_trials, read_masked_study
from neurovfm.probe.embed import FeatureStore, head_inputs
from neurovfm.probe.heads import token_logits
from neurovfm.probe.token_targets import token_targets
from neurovfm.tokens.cache import atomic_write_text

MIN_SIZE_MM = 10.0


def save_dump(path: str, studies: list[dict]) -> None:
    """The dump as one .npz (arrays + a JSON index; no pickle, so reading it runs no code)."""
    arrays, index = {}, []
    for i, st in enumerate(studies):
        arrays[f"s{i}_ov"] = st["ov"]
        series = []
        for si, s in enumerate(st["series"]):
            key = f"s{i}_{si}"
            arrays[f"{key}_head"] = s["head"]
            for vi, v in enumerate(s["views"]):
                arrays[f"{key}_v{vi}"] = v
            series.append({"key": key, "views": len(s["views"])})
        index.append({k: st[k] for k in ("patient", "modality", "findings", "labels")} | {"series": series})
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, index=np.array(json.dumps(index)), **arrays)
    os.replace(tmp, path)


def load_dump(path: str) -> list[dict]:
    with np.load(path, allow_pickle=False) as z:
        index = json.loads(str(z["index"]))
        return [{**st, "ov": z[f"s{i}_ov"],
                 "series": [{"head": z[f"{s['key']}_head"], "views": [z[f"{s['key']}_v{vi}"] for vi in range(s["views"])]}
                            for s in st["series"]]} for i, st in enumerate(index)]


def dump(archive: str, model: str, split: str) -> list[dict]:
    """Per study of ``split`` with a lesion >= 10 mm: which lesions each token touches (all series'
    tokens in order) and per series the head map and each view's token logits."""
    recs = [json.loads(line) for line in open(os.path.join(archive, "records.jsonl")) if line.strip()]
    an = Analyzer(model, AnalyzeConfig(maps="none"))
    todo = [r for r in recs if r["split"] == split and r["modality"] in an.heads
            and any(f["size_mm"] >= MIN_SIZE_MM for f in r["findings"])]
    out = []
    for n, r in enumerate(todo):
        group, ov = read_masked_study(archive, r, an.cfg)
        if not group:
            continue
        mod = r["modality"]
        sh = an.score(mod, group, map_source="head")
        head, hmeta = an.heads[mod]
        views, owner = exam_views(mod, group)
        fitted = hmeta.get("features") or {}
        hin = head_inputs(sh.view_features, views, fitted.get("histogram_bins"), fitted.get("context_radius"))
        with torch.inference_mode():
            tl = [token_logits(head, torch.from_numpy(np.asarray(h, np.float32))).double().numpy() for h in hin]
        out.append({"patient": r["patient"], "modality": mod, "findings": r["findings"], "labels": sh.labels, "ov": ov,
                    "series": [{"head": wh, "views": [tl[v] for v, ow in enumerate(owner) if ow == si]}
                               for si, wh in enumerate(sh.per_series_w)]})
        print(f"dump {n + 1}/{len(todo)}", file=sys.stderr, flush=True)
    return out


def rival_matrix(feats: str, cache: str, archive: str, labels_csv: str, mod: str, labels: list[str]) -> np.ndarray:
    """[C, C] bool: rivals[c, c'] when c' has training lesion tokens and none of them is also c's."""
    rows = list(csv.DictReader(open(labels_csv)))
    keys = [r["study_key"] for r in rows if r["split"] == "train" and r["modality"] == mod]
    tt = token_targets(FeatureStore(feats), cache, archive, keys, labels)
    t = np.concatenate([x for x in tt if x is not None]).astype(np.int64)
    co = t.T @ t  # tokens positive for both labels
    rivals = (co == 0) & (np.diag(co) > 0)[None, :]
    np.fill_diagonal(rivals, False)
    return rivals


def contrast(z: np.ndarray, rivals: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for c in range(z.shape[1]):
        r = np.nonzero(rivals[c])[0]
        out[:, c] = z[:, c] - (z[:, r].max(1) if len(r) else 0.0)
    return out


def score(studies: list[dict], rivals: dict[str, np.ndarray]) -> dict:
    """Per-lesion pointing trials (``explain.pointing.pointing_trials``, as ``neurovfm pointing
    --per-lesion``) of the head map, the token logits and the contrast map, per modality and all."""
    hits: dict[str, dict[str, list[float]]] = {}
    for st in studies:
        mod, labels = st["modality"], st["labels"]
        maps = {"head": np.concatenate([np.asarray(s["head"]) for s in st["series"]]),
                "token": np.concatenate([sum(s["views"]) for s in st["series"]]),
                "contrast": np.concatenate([sum(contrast(v, rivals[mod]) for v in s["views"]) for s in st["series"]])}
        for trial in pointing_trials(st["findings"], st["ov"], labels, MIN_SIZE_MM, pool_same_label=False):
            c = labels.index(trial["label"])
            for name, m in maps.items():
                w = m[:, c] if name == "head" else np.exp(m[:, c] - m[:, c].max())  # logits -> positive, same ties
                h = pointing_hit(w, trial["inside"])
                for group in (mod, "all"):
                    hits.setdefault(group, {}).setdefault(name, []).append(h)
    return {g: {"n_lesions": len(next(iter(v.values()))), **{k: round(float(np.mean(x)), 4) for k, x in v.items()}}
            for g, v in hits.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive")
    ap.add_argument("model")
    ap.add_argument("feats", help="the feature folder the model's heads were fitted on (for the training targets)")
    ap.add_argument("cache")
    ap.add_argument("labels", help="keyed labels.csv")
    ap.add_argument("--split", default="val")
    ap.add_argument("--dump", help=".npz of the per-series token logits: written if missing, read if present")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.dump and os.path.isfile(a.dump):
        studies = load_dump(a.dump)
    else:
        studies = dump(a.archive, a.model, a.split)
        if a.dump:
            save_dump(a.dump, studies)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    rivals = {}
    for mod in sorted({s["modality"] for s in studies}):
        labels = cfg["heads"][f"head_{mod.lower()}"]["labels"]
        rivals[mod] = rival_matrix(a.feats, a.cache, a.archive, a.labels, mod, labels)
    res = {"split": a.split, "model": a.model, "trials": "per lesion >= 10 mm, ties shared",
           "hit_rate": score(studies, rivals),
           "command": " ".join(sys.argv)}
    atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["hit_rate"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
