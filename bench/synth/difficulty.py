"""Is the synthetic archive hard enough, and learnable? Two baselines on its test split.

1. Per-series intensity histograms (uint8 views from the token cache: CT brain/blood/bone
   windows, MR view per sequence family) + logistic regression per headline label.
   Target: macro AUROC <= 0.75 (otherwise the archive is too easy: global intensity solves it).
2. A small supervised 3-D CNN per modality on the same cache: every series of a study is
   resampled from its token grid onto one fixed RAS grid around the head (3 mm in-plane, 4 mm
   slices), so a study is one co-registered multi-channel volume (CT: brain, blood and bone
   windows; MR: one channel per sequence family), plus the patient's age; max / log-sum-exp /
   mean pooling, class-balanced loss, label-preserving augmentation; trained on the train split's
   labels only, the epoch with the best val macro AUROC kept, the test split scored once.
   Target: macro AUROC >= 0.85 (otherwise lesions are invisible or labels inconsistent).
   The histogram baseline is also reported with the age added (atrophy is "advanced for age").
3. The same CNN with the train split's lesion masks as a second, voxel-level target (``cnn_mask_aux``,
   ``--aux-weight``): if labels alone cannot teach the network where to look but masks can, the
   lesions are visible and the gap is the labels-only baseline's; if it fails too on a label, that
   label's lesions are not visible at this resolution. The voxel head's maximum is also reported as a
   study score (``voxel_head_max``).

Both are evaluated on the test split, CT and MR separately, per headline label and macro.
Also reports the per-lesion contrast-to-noise distribution from the archive's masks.

    python bench/synth/difficulty.py ARCHIVE CACHE [--epochs 100] [--inputs FILE.npz] [--aux-weight 1] [--only-cnn]
        [--train-fraction 1] [--seeds 1] [--min-positives 0] [--rotate-deg 0 --scale 0] [--skip-labels-only]
        [--seg-to-head]
        [--out bench/results/synth_difficulty.json]

Is the gap the baseline's? ``--seeds N`` trains N networks per modality and averages their
logits (members reported); ``--min-positives K`` also trains on every other label of the modality
with >= K training positives (the epoch is still chosen on the headline labels); ``--rotate-deg``
/ ``--scale`` add rigid + zoom augmentation.

A learning curve (is the labels-only CNN still data-limited at this archive size?): rerun with
``--only-cnn --aux-weight 0 --train-fraction 0.5`` (and 0.25) on the same ``--inputs``.

CACHE must be `neurovfm ingest ARCHIVE/dicom CACHE` with the same site secret as this run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

from neurovfm.eval.metrics import auroc
from neurovfm.privacy.keys import Keyer
from neurovfm.probe import cnn3d as C
from neurovfm.synth.archive import HEADLINE
from neurovfm.tokens.cache import TokenCache

KINDS = ("CT:soft", "CT:bone", "MR:T1", "MR:T1C", "MR:T2", "MR:FLAIR", "MR:DWI", "MR:ADC", "MR:SWI", "MR:PD", "MR:other")


NOT_LABELS = ("study_uid", "patient_id", "split", "site", "modality", "age", "sex", "triage")


def load_labels(archive: str, keyer: Keyer) -> dict[str, dict]:
    """study key -> split, modality, keyed patient, headline labels ``y`` and every label column
    ``all`` (name -> 1.0 / 0.0, NaN where the column is blank: another modality's label)."""
    out = {}
    with open(os.path.join(archive, "labels.csv"), newline="") as fh:
        for r in csv.DictReader(fh):
            out[keyer.study(r["study_uid"])] = {
                "split": r["split"], "modality": r["modality"], "patient": keyer.patient(r["patient_id"]),
                "y": np.array([1.0 if r.get(h) == "1" else 0.0 for h in HEADLINE], np.float32),
                "all": {c: (float(v) if v in ("0", "1") else np.nan) for c, v in r.items() if c not in NOT_LABELS},
            }
    return out


def training_columns(labels: dict, train: list[str], min_positives: int) -> list[str]:
    """The label columns a CNN learns from: the headline labels first (so their logits are the
    first ones), then every other column of this modality with at least ``min_positives``
    positive studies among ``train``."""
    extra = sorted({c for k in train for c in labels[k]["all"]} - set(HEADLINE))
    counts = {c: sum(labels[k]["all"].get(c) == 1.0 for k in train) for c in extra}
    return list(HEADLINE) + [c for c in extra if counts[c] >= min_positives]


def kind_of(e) -> str:
    k = f"{e.modality}:{e.kernel if e.modality == 'CT' else e.sequence}"
    return k if k in KINDS else "MR:other"


def histogram_features(cache: TokenCache, studies: dict[str, list]) -> dict[str, np.ndarray]:
    bins = np.linspace(0, 256, 33)
    feats = {}
    for sk, entries in studies.items():
        parts = {k: np.zeros(32 * 3) for k in KINDS}
        for e in entries:
            views, _, _ = cache.views(e)
            hs = [np.histogram(views[:, v].ravel(), bins=bins)[0].astype(float) for v in range(views.shape[1])]
            hs = [h / max(h.sum(), 1) for h in hs]
            vec = np.concatenate(hs + [np.zeros(32)] * (3 - len(hs)))
            parts[kind_of(e)] = np.maximum(parts[kind_of(e)], vec) if parts[kind_of(e)].any() else vec
        feats[sk] = np.concatenate([parts[k] for k in KINDS])
    return feats


def evaluate(scores: dict[str, np.ndarray], labels: dict[str, dict]) -> dict:
    res = {}
    for mod in ("CT", "MR"):
        keys = [k for k in scores if labels[k]["split"] == "test" and labels[k]["modality"] == mod]
        if not keys:
            res[mod] = {"n_test": 0, "positives": {}, "auroc": {}, "macro": float("nan")}
            continue
        y = np.stack([labels[k]["y"] for k in keys])
        s = np.stack([scores[k] for k in keys])
        per = {h: auroc(y[:, i], s[:, i]) for i, h in enumerate(HEADLINE)}  # eval.metrics: scikit-learn's definition
        res[mod] = {"n_test": len(keys), "positives": {h: int(y[:, i].sum()) for i, h in enumerate(HEADLINE)},
                    "auroc": per, "macro": float(np.nanmean(list(per.values())))}
    res["macro"] = float(np.nanmean([res["CT"]["macro"], res["MR"]["macro"]]))
    return res


def run_histogram(cache, studies, labels, with_age: bool = False, feats: dict | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = feats if feats is not None else histogram_features(cache, studies)
    if with_age:
        feats = {k: np.append(v, float(studies[k][0].age_years or 60)) for k, v in feats.items()}
    scores = {}
    for mod in ("CT", "MR"):
        tr = [k for k in feats if labels[k]["split"] == "train" and labels[k]["modality"] == mod]
        te = [k for k in feats if labels[k]["modality"] == mod]
        if not tr:
            continue
        sc = StandardScaler().fit(np.stack([feats[k] for k in tr]))
        xtr = sc.transform(np.stack([feats[k] for k in tr]))
        xte = sc.transform(np.stack([feats[k] for k in te]))
        out = np.zeros((len(te), len(HEADLINE)))
        for i in range(len(HEADLINE)):
            y = np.array([labels[k]["y"][i] for k in tr])
            if y.min() == y.max():
                continue
            clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(xtr, y)
            out[:, i] = clf.decision_function(xte)
        for k, row in zip(te, out):
            scores[k] = row
    return evaluate(scores, labels)


# -- the supervised 3-D CNN (neurovfm.probe.cnn3d: the same network `neurovfm evaluate --cnn-baseline` uses) ---
# -- lesion masks on the same grid (for the mask-supervised variant) ------------------------------
# Which lesion voxels stand for which headline label: a finding counts for every headline label it
# is or implies (parents table); brain_mass_effect is a deformation without voxels of its own, so
# in a study labelled with it the space-occupying lesions stand for it. cerebral_atrophy is diffuse
# and has no mask: its column gets no voxel supervision.
AUX = ("intracranial_hemorrhage", "acute_ischemic_stroke", "brain_mass_effect", "small_vessel_ischemic_disease",
       "ventriculomegaly")
MASS_FAMILIES = ("iph", "sdh_acute", "sdh_chronic", "edh", "glioma", "meningioma", "metastases")


def finding_bits(rec: dict) -> dict[int, int]:
    """mask index -> bit field over AUX for one study's findings."""
    from neurovfm.synth.tables import parents

    out: dict[int, int] = defaultdict(int)
    for f in rec["findings"]:
        implied = {f["label"], *parents(rec["modality"], f["label"])}
        for i, h in enumerate(AUX):
            if h in implied or (h == "brain_mass_effect" and h in rec["labels"] and f["family"] in MASS_FAMILIES):
                out[int(f["mask_index"])] |= 1 << i
    return out


def study_mask(archive: str, rec: dict, centre: np.ndarray, grid: C.StudyGrid = C.DEFAULT_GRID) -> np.ndarray:
    """The study's lesion bit field (uint8, bit i = AUX[i]) on the CNN grid around ``centre``.
    Read from the finest non-bone series' mask (all series of a study share the patient frame);
    each grid voxel ORs 8 samples +-1/4 voxel apart so lesions thinner than a voxel are kept."""
    import nibabel as nib

    bits = finding_bits(rec)
    if not bits:
        return np.zeros(grid.shape, np.uint8)
    s = min((s for s in rec["series"] if s["kind"] != "bone"), key=lambda s: s["thickness_mm"])
    img = nib.load(os.path.join(archive, s["mask"]))
    idx = np.asarray(img.dataobj).astype(np.int64)
    lut = np.zeros(max(int(idx.max()), max(bits)) + 1, np.uint8)
    for k, b in bits.items():
        lut[k] = b
    vol = lut[np.clip(idx, 0, None)]
    out = np.zeros(grid.shape, np.uint8)
    inv = np.linalg.inv(img.affine)
    base = C.grid_ras(centre, grid)
    for dz in (-0.25, 0.25):
        for dy in (-0.25, 0.25):
            for dx in (-0.25, 0.25):
                ras = base + np.array([dx * grid.mm[2], dy * grid.mm[1], dz * grid.mm[0]])
                ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
                ok = np.all((ijk >= 0) & (ijk < np.array(vol.shape)), axis=-1)
                out[ok] |= vol[ijk[ok][:, 0], ijk[ok][:, 1], ijk[ok][:, 2]]
    return out


def build_cnn_data(cache, studies, cache_file: str | None = None, archive: str | None = None,
                   records: dict | None = None, antialias: bool = False, grid: C.StudyGrid = C.DEFAULT_GRID) -> dict:
    """study key -> (modality, channels [C, *grid.shape] float16, lesion bit field [*grid.shape] uint8).
    Cached in ``cache_file`` (npz, no pickles; it records whether the volumes were anti-aliased
    and their in-plane spacing, and is refused for another setting); masks need ``archive`` and
    its keyed ``records``."""
    if cache_file and os.path.exists(cache_file):
        z = np.load(cache_file, allow_pickle=False)
        made = bool(z["antialias"]) if "antialias" in z.files else False
        made_mm = float(z["inplane_mm"]) if "inplane_mm" in z.files else C.DEFAULT_GRID.mm[1]
        if made != antialias or made_mm != grid.mm[1]:
            raise SystemExit(f"{cache_file}: its volumes were built with antialias={made} on a {made_mm:g} mm grid, "
                             f"this run asks for antialias={antialias} on {grid.mm[1]:g} mm; name another --inputs file")
        keys = list(z["keys"])
        if "m0" in z.files or archive is None:
            return {k: (str(m), z[f"v{i}"], z[f"m{i}"] if f"m{i}" in z.files else np.zeros(grid.shape, np.uint8))
                    for i, (k, m) in enumerate(zip(keys, z["mods"]))}
    t0 = time.time()
    data = {}
    for sk, entries in studies.items():
        mod, vol, centre = C.study_volume(cache, entries, antialias, grid)
        mask = (study_mask(archive, records[sk], centre, grid) if archive and records and sk in records
                else np.zeros(grid.shape, np.uint8))
        data[sk] = (mod, vol, mask)
    print(f"  cnn inputs: {len(data)} studies in {time.time() - t0:.0f} s", file=sys.stderr)
    if cache_file:
        keys = list(data)
        tmp = cache_file + ".tmp.npz"
        np.savez(tmp, keys=np.array(keys), mods=np.array([data[k][0] for k in keys]), antialias=np.array(antialias),
                 inplane_mm=np.array(grid.mm[1]),
                 **{f"v{i}": data[k][1] for i, k in enumerate(keys)}, **{f"m{i}": data[k][2] for i, k in enumerate(keys)})
        os.replace(tmp, cache_file)
    return data


def train_subset(labels: dict, keys: list[str], fraction: float, seed: int = 0) -> list[str]:
    """The train split's studies of ``keys``, or a seeded share of its *patients* (all of a kept
    patient's studies stay together) for a learning curve."""
    train = [k for k in keys if labels[k]["split"] == "train"]
    if not 0 < fraction <= 1:
        raise ValueError(f"train fraction must be in (0, 1], not {fraction}")
    if fraction == 1:
        return train
    patients = sorted({labels[k]["patient"] for k in train})
    rng = np.random.default_rng([seed, 7])
    keep = set(rng.choice(patients, size=max(2, int(round(fraction * len(patients)))), replace=False))
    return [k for k in train if labels[k]["patient"] in keep]


def run_cnn(cache, studies, labels, epochs: int, seed: int = 0, batch: int = 8, lr: float = 1e-3,
            inputs_file: str | None = None, threads: int | None = None, aux_weight: float = 0.0,
            archive: str | None = None, records: dict | None = None, train_fraction: float = 1.0,
            min_positives: int = 0, seeds: int = 1, rotate_deg: float = 0.0, scale: float = 0.0,
            antialias: bool = False, inplane_mm: float = 3.0, seg_to_head: bool = False) -> dict:
    """One small 3-D CNN per modality, trained on the train split's labels only (and, with
    ``aux_weight`` > 0, the train split's lesion masks as a second, voxel-level target); the epoch
    with the best validation macro AUROC is kept; the test split is scored once, at the end.
    ``train_fraction`` < 1 trains on that share of the train split's patients for ``epochs /
    train_fraction`` epochs, so every point of a learning curve gets the same number of steps.
    ``min_positives`` > 0 also trains on every other label of the modality with at least that
    many positive training studies (multi-task); the epoch is still chosen on the headline labels.
    ``seeds`` > 1 trains that many networks (seeds ``seed``, ``seed`` + 1, ...) on the same data
    and scores their mean logit (each member's test macro AUROC is reported too). ``inplane_mm``:
    the grid's in-plane spacing (``cnn3d.StudyGrid``). ``seg_to_head``: the study head also reads the
    voxel head's peaks (``cnn3d.CNNConfig.seg_to_head``; needs ``aux_weight`` > 0). The result keeps every validation and test
    study's headline logits with its modality, keyed patient and labels (``scores``), so two
    settings can be compared on the same patient resamples (paired_seeds.py); with masks also the
    voxel head's per-class maxima (``voxel_max``, classes in ``scores["voxel_labels"]``)."""
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train fraction must be in (0, 1], not {train_fraction}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, not {seeds}")
    run_epochs = max(1, int(round(epochs / train_fraction)))
    cfg = C.CNNConfig(epochs=run_epochs, batch=batch, lr=lr, seed=seed, threads=threads, aux_weight=aux_weight,
                      rotate_deg=rotate_deg, scale=scale, ensemble=seeds, inplane_mm=inplane_mm,
                      seg_to_head=seg_to_head)
    data = build_cnn_data(cache, studies, inputs_file, archive, records, antialias, cfg.grid)
    age = {k: float(studies[k][0].age_years or 60) for k in data}
    scores, seg_scores, history, best, n_train, cols = {}, {}, {}, {}, {}, {}
    member_scores: list[dict] = [{} for _ in range(seeds)]
    for mod in ("CT", "MR"):
        keys = [k for k in data if data[k][0] == mod]
        split = lambda s: [k for k in keys if labels[k]["split"] == s]  # noqa: E731
        train = train_subset(labels, keys, train_fraction, seed)
        n_train[mod] = len(train)
        cols[mod] = training_columns(labels, train, min_positives) if min_positives > 0 else list(HEADLINE)
        y = {k: np.array([labels[k]["all"].get(c, np.nan) for c in cols[mod]], np.float32) for k in keys}
        # an ensemble (cnn3d: CNNConfig.ensemble) scores the members' mean logit
        out = C.train_cnn({k: data[k][1] for k in keys}, age, y, train, split("val"), keys, cfg,
                          masks={k: data[k][2] for k in keys}, n_aux=len(AUX),
                          log=lambda m, mod=mod: print(m.replace("cnn", f"cnn {mod}", 1), file=sys.stderr),
                          select=list(range(len(HEADLINE))))
        members = out.members or [out]
        for i, o in enumerate(members):
            member_scores[i].update({k: v[:len(HEADLINE)] for k, v in o.logits.items()})
        scores.update({k: out.logits[k][:len(HEADLINE)] for k in keys})
        if aux_weight > 0:
            seg_scores.update(out.voxel_max)
        history[mod] = members[0].history
        best[mod] = {"val_macro_auroc": members[0].val_macro_auroc, "epoch": members[0].best_epoch}
        if seeds > 1:
            best[mod]["members"] = [{"seed": seed + i, "val_macro_auroc": o.val_macro_auroc, "epoch": o.best_epoch}
                                    for i, o in enumerate(members)]
            best[mod]["ensemble_val_macro_auroc"] = out.val_macro_auroc
    res = evaluate(scores, labels)
    if aux_weight > 0:
        # diagnostic: the voxel head's maximum as the study score, for the labels it is trained on
        full = {k: np.array([v[AUX.index(h)] if h in AUX else np.nan for h in HEADLINE]) for k, v in seg_scores.items()}
        seg = evaluate(full, labels)
        res["voxel_head_max"] = {m: {"auroc": {h: seg[m]["auroc"][h] for h in AUX}} for m in ("CT", "MR")}
    if seeds > 1:
        res["members"] = []
        for i, m in enumerate(member_scores):
            e = evaluate(m, labels)
            res["members"].append({"seed": seed + i, "macro": e["macro"], "CT": e["CT"]["macro"], "MR": e["MR"]["macro"]})
    res["val_best"] = best
    res["scores"] = {"labels": list(HEADLINE),
                     **{split: {k: {"modality": labels[k]["modality"], "patient": labels[k]["patient"],
                                    "y": [float(x) for x in labels[k]["y"]], "score": [float(x) for x in v],
                                    # the voxel head's flip-averaged maximum per AUX class (a fusion of the two
                                    # scores can then be fitted on validation and scored on test after the fact)
                                    **({"voxel_max": [float(x) for x in seg_scores[k]]} if aux_weight > 0 else {})}
                                for k, v in scores.items() if labels[k]["split"] == split} for split in ("val", "test")}}
    if aux_weight > 0:
        res["scores"]["voxel_labels"] = list(AUX)
    res["history"] = history
    res["setup"] = {"grid": cfg.grid.shape, "grid_mm": cfg.grid.mm, "antialias": antialias, "ct_channels": C.CT_CHANNELS, "mr_channels": C.MR_CHANNELS,
                    "batch": batch, "lr": lr, "epochs": run_epochs, "seed": seed, "seeds": seeds,
                    "aux_weight": aux_weight, "seg_to_head": seg_to_head, "rotate_deg": rotate_deg, "scale": scale,
                    "train_fraction": train_fraction, "n_train_studies": n_train,
                    "training_labels": cols, "min_positives": min_positives,
                    "aux_labels": AUX if aux_weight > 0 else [],
                    "model": "neurovfm.probe.cnn3d.StudyCNN per modality: conv(C->16, stride 1x2x2) + 3 x [maxpool, "
                             "conv, conv] (32, 64, 128), BatchNorm, max + log-sum-exp + mean pooling, age, linear head; "
                             "AdamW, warmup + cosine, class-balanced BCE, left-right flip / shift / intensity jitter, "
                             "flip-averaged scores"
                             + (f"; voxel head (1x1x1 conv on the 64-channel level, {4 * cfg.grid.mm[0]:g} x "
                                f"{8 * cfg.grid.mm[1]:g} x {8 * cfg.grid.mm[2]:g} mm voxels) trained on max-pooled "
                                "lesion masks with class-balanced BCE" if aux_weight > 0 else "")
                             + ("; the study head also reads the voxel head's detached per-class maxima"
                                if seg_to_head else "")}
    return res


def lesion_cnr(archive: str, max_studies: int = 80) -> dict:
    """Per-lesion contrast-to-noise ratio in the written series (native grid, no resampling):
    |median inside - median of a 2-4 voxel ring| / noise SD (MAD of the high-pass image inside
    the head). CT soft-kernel series and MR series; bone-kernel series are skipped."""
    import glob

    import nibabel as nib
    import pydicom
    from scipy import ndimage

    rows = []
    with open(os.path.join(archive, "findings.jsonl")) as fh:
        recs = [json.loads(line) for line in fh][:max_studies]
    for rec in recs:
        for s in rec["series"]:
            if s["kind"] == "bone":
                continue
            dss = [pydicom.dcmread(f) for f in glob.glob(os.path.join(archive, s["path"], "*"))]
            n = np.cross(np.array(dss[0].ImageOrientationPatient[:3], float), np.array(dss[0].ImageOrientationPatient[3:], float))
            dss.sort(key=lambda d: float(np.dot(n, np.array(d.ImagePositionPatient, float))))
            vol = np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in dss]).astype(np.float32)
            mask = np.transpose(np.asarray(nib.load(os.path.join(archive, s["mask"])).dataobj), (2, 1, 0))
            head = vol > (-500 if rec["modality"] == "CT" else np.percentile(vol, 30))
            hp = vol - ndimage.gaussian_filter(vol, (0, 2, 2))
            noise = 1.4826 * np.median(np.abs(hp[head] - np.median(hp[head])))
            for f in rec["findings"]:
                m = mask == f["mask_index"]
                if m.sum() < 5:
                    continue
                ring = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=2) & head
                if ring.sum() < 5:
                    continue
                cnr = abs(float(np.median(vol[m]) - np.median(vol[ring]))) / max(noise, 1e-6)
                rows.append({"modality": rec["modality"], "kind": s["kind"], "family": f["family"], "cnr": cnr})
    out = {}
    for key in sorted({(r["modality"], r["family"]) for r in rows}):
        v = np.array([r["cnr"] for r in rows if (r["modality"], r["family"]) == key])
        out[f"{key[0]}:{key[1]}"] = {"n": int(v.size), "p10": float(np.percentile(v, 10)), "median": float(np.median(v)),
                                      "p90": float(np.percentile(v, 90))}
    allv = np.array([r["cnr"] for r in rows]) if rows else np.zeros(1)
    out["_all"] = {"n": len(rows), "p10": float(np.percentile(allv, 10)), "median": float(np.median(allv)),
                   "p90": float(np.percentile(allv, 90)), "fraction_below_1": float((allv < 1).mean())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("archive")
    ap.add_argument("cache")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default="bench/results/synth_difficulty.json")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--inputs", help="npz file caching the CNN's resampled study volumes (made if missing)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="also train the CNN with the lesion masks as a voxel-level target at this loss weight "
                         "(reported as cnn_mask_aux beside the labels-only cnn); 0 to skip")
    ap.add_argument("--only-cnn", action="store_true", help="skip the histogram baseline and the CNR survey")
    ap.add_argument("--skip-cnr", action="store_true", help="skip the CNR survey (it reads DICOM of 80 studies)")
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="learning curve: train the CNNs on this share of the train split's patients, for "
                         "epochs / fraction epochs (same number of steps); validation and test unchanged")
    ap.add_argument("--min-positives", type=int, default=0,
                    help="multi-task: the CNNs also learn every other label of their modality with at least this many "
                         "positive training studies (the epoch is still chosen on the headline labels); 0: headline only")
    ap.add_argument("--seed", type=int, default=0, help="the CNN's seed (the first of an ensemble's)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="an ensemble: train this many CNNs per modality (consecutive seeds) and average their logits")
    ap.add_argument("--rotate-deg", type=float, default=0.0,
                    help="augmentation: random rotation up to this many degrees about S-I (half about the other axes)")
    ap.add_argument("--scale", type=float, default=0.0, help="augmentation: random isotropic zoom in 1 +- this")
    ap.add_argument("--antialias", action="store_true",
                    help="box-average each series to the CNN grid's spacing before sampling it (cnn3d._resample)")
    ap.add_argument("--inplane-mm", type=float, default=3.0,
                    help="the CNN grid's in-plane spacing in mm (slices stay 4 mm); 2 keeps thinner findings, ~2.7x the time")
    ap.add_argument("--seg-to-head", action="store_true",
                    help="the mask-supervised CNN's study head also reads its voxel head's per-class peaks "
                         "(cnn3d.CNNConfig.seg_to_head); needs --aux-weight > 0 and --skip-labels-only")
    ap.add_argument("--skip-labels-only", action="store_true",
                    help="train only the mask-supervised CNN (needs --aux-weight > 0)")
    a = ap.parse_args()
    if a.only_cnn and a.skip_cnn:
        ap.error("nothing left to measure: --only-cnn with --skip-cnn skips every baseline")
    if a.skip_labels_only and a.aux_weight <= 0:
        ap.error("--skip-labels-only leaves only the mask-supervised CNN: it needs --aux-weight > 0")
    if a.seg_to_head and not (a.skip_labels_only and a.aux_weight > 0):
        ap.error("--seg-to-head applies to the mask-supervised CNN only: it needs --aux-weight > 0 and --skip-labels-only")
    if a.seeds < 1:
        ap.error(f"--seeds must be >= 1, not {a.seeds}")
    if a.seed < 0:
        ap.error(f"--seed must be >= 0, not {a.seed}")
    if a.min_positives < 0:
        ap.error(f"--min-positives must be >= 0, not {a.min_positives}")
    try:  # the network's own checks, before minutes of loading and the histogram baseline
        C.CNNConfig(epochs=a.epochs, rotate_deg=a.rotate_deg, scale=a.scale, aux_weight=max(a.aux_weight, 0),
                    inplane_mm=a.inplane_mm)
    except ValueError as e:
        ap.error(str(e))
    if not 0 < a.train_fraction <= 1:
        ap.error(f"--train-fraction must be in (0, 1], not {a.train_fraction}")
    keyer = Keyer.from_site()
    labels = load_labels(a.archive, keyer)
    with open(os.path.join(a.archive, "findings.jsonl")) as fh:
        records = {keyer.study(r["study_uid"]): r for r in map(json.loads, fh) if r}
    cache = TokenCache(a.cache)
    studies: dict[str, list] = defaultdict(list)
    for e in cache.series():
        if e.study_key in labels:
            studies[e.study_key].append(e)
    missing = set(labels) - set(studies)
    print(f"studies: {len(studies)} in cache, {len(missing)} labelled studies missing from it", file=sys.stderr)
    res = {"command": " ".join(sys.argv), "headline": list(HEADLINE)}
    if not a.only_cnn:
        t0 = time.time()
        feats = histogram_features(cache, studies)
        res["histogram_lr"] = run_histogram(cache, studies, labels, feats=feats)
        res["histogram_lr"]["seconds"] = time.time() - t0
        print(json.dumps({k: res["histogram_lr"][k] for k in ("macro",)}), file=sys.stderr)
        t0 = time.time()
        res["histogram_lr_with_age"] = run_histogram(cache, studies, labels, with_age=True, feats=feats)
        res["histogram_lr_with_age"]["seconds"] = time.time() - t0
        if not a.skip_cnr:
            res["lesion_cnr"] = lesion_cnr(a.archive)
            print("lesion CNR (all):", json.dumps(res["lesion_cnr"]["_all"]), file=sys.stderr)
    if not a.skip_cnn:
        variants = ([] if a.skip_labels_only else [("cnn", 0.0)]) + (
            [("cnn_mask_aux", a.aux_weight)] if a.aux_weight > 0 else [])
        for name, w in variants:
            t0 = time.time()
            res[name] = run_cnn(cache, studies, labels, a.epochs, inputs_file=a.inputs, threads=a.threads,
                                aux_weight=w, archive=a.archive, records=records, train_fraction=a.train_fraction,
                                min_positives=a.min_positives, seed=a.seed, seeds=a.seeds, rotate_deg=a.rotate_deg, scale=a.scale,
                                antialias=a.antialias, inplane_mm=a.inplane_mm, seg_to_head=a.seg_to_head)
            res[name]["seconds"] = time.time() - t0
    for name in ("histogram_lr", "histogram_lr_with_age", "cnn", "cnn_mask_aux"):
        if name not in res:
            continue
        r = res[name]
        print(f"\n{name}: macro AUROC {r['macro']:.3f}")
        for mod in ("CT", "MR"):
            print(f"  {mod} (n={r[mod]['n_test']}): macro {r[mod]['macro']:.3f}  " +
                  "  ".join(f"{h}={v:.2f}({r[mod]['positives'][h]})" for h, v in r[mod]["auroc"].items()))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
