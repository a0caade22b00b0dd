"""Does Vol-JEPA's own prediction error point at lesions, with no labels at all?

The pointing game asks a head trained on study labels to find lesions, and on the default archive
it does no better than chance (README). The pretraining objective offers a label-free map: mask
tokens the way pretraining does, let the student + predictor predict the teacher's features of
the masked tokens from the rest, and score each token by how badly it was predicted (averaged over
several seeded masks). A lesion is what the context does not predict, so its tokens should be
surprising — if the encoder learned anything about normal anatomy.

For every series of the chosen split whose study has a finding of at least ``--min-size-mm``
(synthetic archive: exact lesion masks on each series' grid), this prints and saves, per modality:

* token AUROC of the surprise for lesion vs other tokens (pooled over series, patient bootstrap);
* pointing: per study, is the most surprising token (over all its series) in a lesion? beside the
  uniform expectation (share of the study's tokens in a lesion) and an intensity-outlier map
  (|token mean - series median| / MAD) that needs no model; patient-bootstrap intervals of
  hit rate - uniform.

``--random-init`` is the control: the same architecture, masks and seeds with fresh weights, so
that what pretraining adds is visible. ``--pair A.json B.json`` compares two saved outputs study by
study (patient bootstrap of the hit-rate difference).

Usage (site secret of the archive in NEUROVFM_SITE_SECRET):
  python bench/explain/jepa_surprise.py --run PT --archive A/archive --cache A/cache --out OUT.json
  python bench/explain/jepa_surprise.py --pair OUT.json OUT_RANDOM.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError
from neurovfm.eval import metrics as M
from neurovfm.eval.anatomy import token_codes
from neurovfm.eval.lesion_probe import read_lesion_truth
from neurovfm.models.encoder import Encoder
from neurovfm.models.packing import Packed
from neurovfm.pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, sub_state
from neurovfm.pretrain.config import config_from_dict
from neurovfm.pretrain.jepa import JEPA
from neurovfm.pretrain.data import KIND_SOFT, token_kinds
from neurovfm.pretrain.masks import make_mask
from neurovfm.privacy.keys import Keyer
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.normalize import normalize


class SurpriseInputError(NeuroVFMError):
    """A run, archive, cache or saved output this script cannot use."""


def load_run(run: str, random_init: bool = False, seed: int = 0):
    path = latest_checkpoint(run) if os.path.isdir(os.path.join(run, "checkpoints")) else run
    if path is None:
        raise SurpriseInputError(f"{run}: no checkpoint (give a pretraining run folder or one checkpoint)")
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as e:
        raise SurpriseInputError(str(e)) from None
    cfg = config_from_dict(meta["config"])
    torch.manual_seed(seed)
    model = JEPA(cfg.model.encoder_config(), cfg.model.predictor_config())
    teacher = Encoder(cfg.model.encoder_config())
    if random_init:  # the control: same architecture and masks, no pretraining (teacher = student)
        teacher.load_state_dict(model.student.state_dict())
        return model.eval(), teacher.eval(), cfg, f"random-init (seed {seed}) like {path}"
    model.student.load_state_dict(sub_state(tensors, "student"))
    model.predictor.load_state_dict(sub_state(tensors, "predictor"))
    teacher.load_state_dict(sub_state(tensors, "teacher"))
    return model.eval(), teacher.eval(), cfg, path


def series_seed(seed: int, key: str, r: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}|{key}|{r}".encode()).digest()[:8], "little")
    return np.random.default_rng(h)


@torch.no_grad()
def surprise(model: JEPA, teacher: Encoder, tok: torch.Tensor, coords: np.ndarray, modality: str, mask_cfg,
             rounds: int, key: str, seed: int) -> np.ndarray:
    """Mean Smooth-L1 prediction error of each token over the rounds that made it a target
    (tokens never targeted get the series' median)."""
    ct = torch.from_numpy(coords)
    n = len(coords)
    h = teacher(Packed(tok, ct, [0, n]))
    target = F.layer_norm(h.float(), (h.shape[-1],))
    tot, cnt = np.zeros(n), np.zeros(n)
    for r in range(rounds):
        c, t = make_mask(coords, modality, mask_cfg, series_seed(seed, key, r))
        c, t = torch.from_numpy(np.asarray(c)), torch.from_numpy(np.asarray(t))
        if len(c) == 0 or len(t) == 0:
            continue
        z = model.student(Packed(tok[c], ct[c], [0, len(c)]))
        pred = model.predictor(z, ct[c], [0, len(c)], ct[t], [0, len(t)])
        e = F.smooth_l1_loss(pred.float(), target[t], reduction="none").mean(-1).numpy()
        np.add.at(tot, t.numpy(), e)
        np.add.at(cnt, t.numpy(), 1)
    out = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return np.where(np.isnan(out), np.nanmedian(out) if np.isfinite(out).any() else 0.0, out)


def intensity_outlier(u8: np.ndarray) -> np.ndarray:
    m = u8.astype(np.float64).mean(1)
    med = np.median(m)
    mad = np.median(np.abs(m - med)) + 1e-6
    return np.abs(m - med) / mad


def boot(values: dict[str, list[tuple[float, float]]], n: int, seed: int) -> list[float]:
    """Patient bootstrap of mean(a) - mean(b) over per-study pairs grouped by patient."""
    pats = list(values)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        take = [x for p in rng.choice(len(pats), len(pats)) for x in values[pats[p]]]
        a = np.array(take)
        diffs.append(a[:, 0].mean() - a[:, 1].mean())
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def paired(path_a: str, path_b: str, n: int = 1000, seed: int = 0) -> dict[str, dict[str, object]]:
    """Per modality, the patient-bootstrap interval of the pointing hit rate of run A's surprise
    minus run B's, over the studies both scored (two saved outputs of this script)."""
    runs = []
    for p in (path_a, path_b):
        try:
            with open(p) as fh:
                runs.append({(r["modality"], r["patient"], i): r for i, r in enumerate(json.load(fh)["studies"])})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SurpriseInputError(f"{p}: not an output of this script ({type(e).__name__}: {e})") from None
    out = {}
    for mod in sorted({k[0] for k in runs[0]}):
        pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for k, r in runs[0].items():
            if k[0] == mod and k in runs[1]:
                if abs(r["uniform"] - runs[1][k]["uniform"]) > 1e-12:
                    raise SurpriseInputError(f"{path_a} and {path_b} scored different studies")
                pairs[r["patient"]].append((r["hit_surprise"], runs[1][k]["hit_surprise"]))
        a = np.array([x for v in pairs.values() for x in v])
        if not len(a):
            continue  # no study of this modality in both
        out[mod] = {"studies": len(a), "a": float(a[:, 0].mean()), "b": float(a[:, 1].mean()),
                    "a_minus_b": float(a[:, 0].mean() - a[:, 1].mean()), "ci95": boot(pairs, n, seed)}
    return out


def main(argv=None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except NeuroVFMError as e:  # this script's input errors and the package's (cache, archive, secret)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--pair"]:
        if len(argv) != 3:
            print("usage: jepa_surprise.py --pair A.json B.json", file=sys.stderr)
            return 2
        print(json.dumps(paired(argv[1], argv[2]), indent=1))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="pretraining run folder (checkpoints/) or one checkpoint")
    ap.add_argument("--archive", required=True, help="synthetic archive (records.jsonl + lesion masks)")
    ap.add_argument("--cache", required=True, help="token cache ingested from that archive")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rounds", type=int, default=8, help="seeded pretraining masks per series")
    ap.add_argument("--min-size-mm", type=float, default=10.0)
    ap.add_argument("--ct-view", default="brain")
    ap.add_argument("--max-studies", type=int, default=0, help="per modality (0 = all)")
    ap.add_argument("--modalities", default="CT,MR")
    ap.add_argument("--soft-tissue", action="store_true",
                    help="score only soft-tissue tokens (not bone or air; CT: read from the bone window): every "
                         "map and the uniform baseline are restricted to them, the context stays the whole series")
    ap.add_argument("--random-init", action="store_true",
                    help="control: the run's architecture with fresh seeded weights instead of its checkpoint")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    mods = a.modalities.split(",")
    if a.rounds < 1 or a.bootstrap < 100 or a.max_studies < 0 or not set(mods) <= {"CT", "MR"}:
        ap.error("need --rounds >= 1, --bootstrap >= 100, --max-studies >= 0 and --modalities among CT,MR")
    for p in (a.archive, a.cache):
        if not os.path.isdir(p):
            print(f"error: {p}: no such folder", file=sys.stderr)
            return 2
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        keyer = Keyer.from_site()
    except FileNotFoundError as e:
        raise SurpriseInputError(str(e)) from None
    truth = read_lesion_truth(a.archive, keyer, a.min_size_mm)
    cache = TokenCache(a.cache)
    windows = [w.name for w in cache.policy.ct_windows]
    if "CT" in mods and (a.ct_view not in windows or (a.soft_tissue and "bone" not in windows)):
        print(f"error: {a.cache}: CT windows are {windows}; --ct-view {a.ct_view!r}"
              + (" and --soft-tissue (needs 'bone')" if a.soft_tissue else "") + " cannot be read", file=sys.stderr)
        return 2
    by_study: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sk, t in truth.items():
        if t.split == a.split and t.big_lesion and t.modality in mods:
            by_study[(t.modality, t.study_key)].append(sk)
    if not any(_in_cache(cache, sk) for sks in by_study.values() for sk in sks):
        # e.g. another site secret (no key of the archive is in the cache), another cache, an empty split
        raise SurpriseInputError(f"no {a.split}-split series of {a.archive} with a finding >= {a.min_size_mm} mm is "
                                 f"in {a.cache} (same archive, cache and NEUROVFM_SITE_SECRET?); nothing written")
    model, teacher, cfg, ck = load_run(a.run, a.random_init, a.seed)
    plan = sorted(by_study)
    if a.max_studies:
        keep, seen = [], defaultdict(int)
        for m, s in plan:
            if seen[m] < a.max_studies:
                keep.append((m, s))
                seen[m] += 1
        plan = keep
    rows = []
    tokens: dict[str, list[tuple[np.ndarray, np.ndarray, str, np.ndarray]]] = defaultdict(list)
    for mod, st in tqdm(plan, desc="surprise", unit="study", file=sys.stderr):
        les_all, sur_all, inten_all, pat = [], [], [], None
        for sk in sorted(by_study[(mod, st)]):
            try:
                entry = cache.get(sk)
            except KeyError:
                continue
            if mod == "CT":  # the bone window too when it decides soft tissue: one read of the series
                u8, coords, _ = cache.views(entry, [a.ct_view, "bone"] if a.soft_tissue and a.ct_view != "bone"
                                            else [a.ct_view])
                view = a.ct_view
            else:
                u8, coords, _ = cache.views(entry)
                view = "mr"
            bone = np.asarray(u8[:, -1]) if mod == "CT" and a.soft_tissue else None
            u8 = np.asarray(u8[:, 0])
            coords = np.asarray(coords, np.int64)
            if len(coords) < cfg.mask.min_tokens:
                continue
            tok = normalize(u8, view)
            s = surprise(model, teacher, tok, coords, mod, cfg.mask, a.rounds, sk, a.seed)
            _, code = token_codes(entry.grid_affine_array, coords, nib.load(truth[sk].mask))
            les, inten = code > 0, intensity_outlier(u8)
            if a.soft_tissue:
                kind = token_kinds(bone, "bone") if bone is not None else token_kinds(u8, view)
                keep = kind == KIND_SOFT
                les, s, inten = les[keep], s[keep], inten[keep]
            les_all.append(les)
            sur_all.append(s)
            inten_all.append(inten)
            pat = truth[sk].patient_key
            tokens[mod].append((les, s, pat, inten_all[-1]))
        if not les_all:
            continue
        les = np.concatenate(les_all)
        if not les.any():
            continue
        sur, inten = np.concatenate(sur_all), np.concatenate(inten_all)
        rows.append({"modality": mod, "patient": pat, "uniform": float(les.mean()),
                     "hit_surprise": float(les[int(np.argmax(sur))]), "hit_intensity": float(les[int(np.argmax(inten))]),
                     "mass_inside_surprise": float(sur[les].sum() / sur.sum()) if sur.sum() > 0 else 0.0})
    if not rows:
        raise SurpriseInputError(f"no study of {a.archive} had lesion tokens in {a.cache}; nothing written")
    result = {"run": ck, "config": {k: v for k, v in vars(a).items() if k != "out"}, "modalities": {}}
    for mod in sorted({r["modality"] for r in rows}):
        rs = [r for r in rows if r["modality"] == mod]
        y = np.concatenate([t[0] for t in tokens[mod]]).astype(float)
        s = np.concatenate([t[1] for t in tokens[mod]])
        inten = np.concatenate([t[3] for t in tokens[mod]])
        groups = np.concatenate([[t[2]] * len(t[0]) for t in tokens[mod]])
        auc = M.auroc(y, s)
        pairs_s, pairs_i, pairs_si = defaultdict(list), defaultdict(list), defaultdict(list)
        for r in rs:
            pairs_s[r["patient"]].append((r["hit_surprise"], r["uniform"]))
            pairs_i[r["patient"]].append((r["hit_intensity"], r["uniform"]))
            pairs_si[r["patient"]].append((r["hit_surprise"], r["hit_intensity"]))
        res = {"studies": len(rs), "patients": len(pairs_s), "tokens": int(len(y)), "lesion_tokens": int(y.sum()),
               "token_auroc": float(auc),
               "token_auroc_ci95": _auroc_ci(y, s, groups, a.bootstrap, a.seed),
               "token_auroc_intensity": float(M.auroc(y, inten)),
               "hit_rate_surprise": float(np.mean([r["hit_surprise"] for r in rs])),
               "hit_rate_intensity": float(np.mean([r["hit_intensity"] for r in rs])),
               "uniform_hit_rate": float(np.mean([r["uniform"] for r in rs])),
               "surprise_minus_uniform_ci95": boot(pairs_s, a.bootstrap, a.seed),
               "intensity_minus_uniform_ci95": boot(pairs_i, a.bootstrap, a.seed),
               "surprise_minus_intensity_ci95": boot(pairs_si, a.bootstrap, a.seed),
               "mass_inside_surprise": float(np.mean([r["mass_inside_surprise"] for r in rs]))}
        result["modalities"][mod] = res
        print(f"{mod}: {res['studies']} studies; token AUROC {auc:.3f} {res['token_auroc_ci95']} (intensity "
              f"{res['token_auroc_intensity']:.3f}); pointing "
              f"surprise {res['hit_rate_surprise']:.3f}  intensity {res['hit_rate_intensity']:.3f}  uniform "
              f"{res['uniform_hit_rate']:.3f}; mass inside {res['mass_inside_surprise']:.3f}")
    result["studies"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(a.out + ".tmp", a.out)
    return 0


def _auroc_ci(y: np.ndarray, s: np.ndarray, groups: np.ndarray, n: int, seed: int) -> list[float]:
    """Token AUROC's patient-bootstrap interval (the evaluation's resampler, eval.metrics)."""
    ci = M.bootstrap_ci(y, s, groups, M.auroc, n=n, seed=seed)
    return [ci["low"], ci["high"]]


def _in_cache(cache: TokenCache, series_key: str) -> bool:
    try:
        cache.get(series_key)
    except KeyError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
