"""Is the synthetic archive hard enough, and learnable? Two baselines on its test split.

1. Per-series intensity histograms (uint8 views from the token cache: CT brain/blood/bone
   windows, MR view per sequence family) + logistic regression per headline label.
   Target: macro AUROC <= 0.75 (otherwise the archive is too easy: global intensity solves it).
2. A small supervised 3-D CNN on the same cache (each series' tokens reassembled into its
   canonical volume, resized; one shared encoder per series, max-pooled over the study's series,
   one logit per headline label), trained on the train split, model picked on val.
   Target: macro AUROC >= 0.85 (otherwise lesions are invisible or labels inconsistent).

Both are evaluated on the test split, CT and MR separately, per headline label and macro.
Also reports the per-lesion contrast-to-noise distribution from the archive's masks.

    python bench/synth/difficulty.py ARCHIVE CACHE [--epochs 12] [--out bench/results/synth_difficulty.json]

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

from neurovfm.privacy.keys import Keyer
from neurovfm.synth.archive import HEADLINE
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.patches import unpatchify

KINDS = ("CT:soft", "CT:bone", "MR:T1", "MR:T1C", "MR:T2", "MR:FLAIR", "MR:DWI", "MR:ADC", "MR:SWI", "MR:PD", "MR:other")


def load_labels(archive: str, keyer: Keyer) -> dict[str, dict]:
    out = {}
    with open(os.path.join(archive, "labels.csv"), newline="") as fh:
        for r in csv.DictReader(fh):
            out[keyer.study(r["study_uid"])] = {
                "split": r["split"], "modality": r["modality"],
                "y": np.array([1.0 if r.get(h) == "1" else 0.0 for h in HEADLINE], np.float32),
            }
    return out


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


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    r = np.arange(1, len(order) + 1, dtype=float)
    while i < len(order):
        j = i
        while j + 1 < len(order) and allv[j + 1] == allv[i]:
            j += 1
        r[i:j + 1] = (i + j + 2) / 2
        i = j + 1
    ranks[order] = r
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(scores: dict[str, np.ndarray], labels: dict[str, dict]) -> dict:
    res = {}
    for mod in ("CT", "MR"):
        keys = [k for k in scores if labels[k]["split"] == "test" and labels[k]["modality"] == mod]
        if not keys:
            res[mod] = {"n_test": 0, "positives": {}, "auroc": {}, "macro": float("nan")}
            continue
        y = np.stack([labels[k]["y"] for k in keys])
        s = np.stack([scores[k] for k in keys])
        per = {h: auroc(y[:, i], s[:, i]) for i, h in enumerate(HEADLINE)}
        res[mod] = {"n_test": len(keys), "positives": {h: int(y[:, i].sum()) for i, h in enumerate(HEADLINE)},
                    "auroc": per, "macro": float(np.nanmean(list(per.values())))}
    res["macro"] = float(np.nanmean([res["CT"]["macro"], res["MR"]["macro"]]))
    return res


def run_histogram(cache, studies, labels) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = histogram_features(cache, studies)
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


def dense_volume(cache, e, size) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    views, coords, _ = cache.views(e, ["brain"] if e.modality == "CT" else None)
    grid = tuple(json.loads(e.grid_shape))
    full = np.zeros((int(np.prod(grid)), views.shape[2]), np.float32)
    flat = np.ravel_multi_index(coords.T.astype(int), grid)
    full[flat] = views[:, 0].astype(np.float32) / 255.0
    vol = unpatchify(full, grid, cache.policy.patch)
    t = torch.from_numpy(np.ascontiguousarray(vol))[None, None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy().astype(np.float16)


def run_cnn(cache, studies, labels, epochs: int, size=(28, 96, 96), seed: int = 0) -> dict:
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    data = {}
    for sk, entries in studies.items():
        vols = np.stack([dense_volume(cache, e, size) for e in entries])
        kinds = np.array([KINDS.index(kind_of(e)) for e in entries])
        data[sk] = (vols, kinds)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            ch = [1, 16, 32, 64, 96]
            layers = []
            for a, b in zip(ch[:-1], ch[1:]):
                layers += [nn.Conv3d(a, b, 3, stride=(1 if a == 1 else 2, 2, 2), padding=1), nn.GroupNorm(8, b), nn.ReLU(),
                           nn.Conv3d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.ReLU()]
            self.enc = nn.Sequential(*layers)
            self.kind = nn.Embedding(len(KINDS), 2 * ch[-1])
            self.head = nn.Sequential(nn.Linear(4 * ch[-1], 128), nn.ReLU(), nn.Linear(128, len(HEADLINE)))

        def forward(self, vols, kinds):
            f = self.enc((vols - 0.25) / 0.3)
            f = torch.cat([f.amax(dim=(2, 3, 4)), f.mean(dim=(2, 3, 4))], 1) + self.kind(kinds)
            return self.head(torch.cat([f.max(0).values, f.mean(0)]))

    net = Net()
    accum = 8
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    train = [k for k in data if labels[k]["split"] == "train"]
    val = [k for k in data if labels[k]["split"] == "val"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * (len(train) // accum + 1))
    ys = np.stack([labels[k]["y"] for k in train])
    pos_w = torch.tensor((len(ys) - ys.sum(0)) / np.maximum(ys.sum(0), 1), dtype=torch.float32).clamp(max=5)
    lossf = nn.BCEWithLogitsLoss(pos_weight=pos_w)

    def predict(keys):
        net.eval()
        out = {}
        with torch.no_grad():
            for k in keys:
                v, kd = data[k]
                out[k] = net(torch.from_numpy(v.astype(np.float32))[:, None], torch.from_numpy(kd)).numpy()
        return out

    best, best_state, history = -1.0, None, []
    for ep in range(epochs):
        net.train()
        t0 = time.time()
        order = np.random.permutation(len(train))
        losses = []
        opt.zero_grad()
        for step, i in enumerate(order):
            k = train[i]
            v, kd = data[k]
            x = torch.from_numpy(v.astype(np.float32))[:, None]
            if np.random.rand() < 0.5:
                x = x.flip(-1)  # left-right flip: headline labels are side-free
            loss = lossf(net(x, torch.from_numpy(kd)), torch.from_numpy(labels[k]["y"]))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {ep}")
            (loss / accum).backward()
            losses.append(loss.item())
            if (step + 1) % accum == 0 or step == len(order) - 1:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                sched.step()
        vs = predict(val)
        yv = np.stack([labels[k]["y"] for k in val])
        sv = np.stack([vs[k] for k in val])
        vals = [auroc(yv[:, i], sv[:, i]) for i in range(len(HEADLINE))] if val else []
        vauc = float(np.nanmean(vals)) if vals and not np.all(np.isnan(vals)) else 0.0
        spread = float(sv.std(0).mean()) if len(sv) else 0.0
        history.append({"epoch": ep, "train_loss": float(np.mean(losses)), "val_macro_auroc": vauc,
                        "val_score_spread": spread, "seconds": time.time() - t0})
        print(f"  cnn epoch {ep}: loss {np.mean(losses):.3f} val macro AUROC {vauc:.3f} spread {spread:.3f} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr)
        if vauc > best:
            best = vauc
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    res = evaluate(predict(list(data)), labels)
    res["val_best"] = best
    res["history"] = history
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
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="bench/results/synth_difficulty.json")
    ap.add_argument("--skip-cnn", action="store_true")
    a = ap.parse_args()
    keyer = Keyer.from_site()
    labels = load_labels(a.archive, keyer)
    cache = TokenCache(a.cache)
    studies: dict[str, list] = defaultdict(list)
    for e in cache.series():
        if e.study_key in labels:
            studies[e.study_key].append(e)
    missing = set(labels) - set(studies)
    print(f"studies: {len(studies)} in cache, {len(missing)} labelled studies missing from it", file=sys.stderr)
    res = {"command": " ".join(sys.argv), "headline": list(HEADLINE)}
    t0 = time.time()
    res["histogram_lr"] = run_histogram(cache, studies, labels)
    res["histogram_lr"]["seconds"] = time.time() - t0
    print(json.dumps({k: res["histogram_lr"][k] for k in ("macro",)}), file=sys.stderr)
    res["lesion_cnr"] = lesion_cnr(a.archive)
    print("lesion CNR (all):", json.dumps(res["lesion_cnr"]["_all"]), file=sys.stderr)
    if not a.skip_cnn:
        t0 = time.time()
        res["cnn"] = run_cnn(cache, studies, labels, a.epochs)
        res["cnn"]["seconds"] = time.time() - t0
    for name in ("histogram_lr", "cnn"):
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
