"""Does the cross-series mean help a label-specific token probe point at MRI lesions? (validation only)

    NEUROVFM_SITE_SECRET=... python bench/explain/cross_series_probe_val.py FEATS_CTX CACHE ARCHIVE OUT.json

FEATS_CTX: a feature folder with the neighbourhood appended (``embed --append-context 1``). Per MRI
label with >= 20 training lesion tokens, an L2 logistic token probe (standardised, C = 0.1, balanced;
all train-split lesion tokens of MRI studies and 30,000 seeded other tokens) is fitted on
A = [own, neighbourhood] and on B = A + the cross-series mean (``neurovfm.probe.context``), and
scored on validation MRI studies: label-specific probe pointing (the study's top token for label c
lies in a lesion of label c, study-labels with a lesion >= 10 mm) and token AUROC among lesion
tokens (label c vs other lesions). Lesion tokens: mask non-zero at the token centre. Plan O,
/work/runs/s41/PLAN.txt; record bench/results/cross_series_probe_r500d_val.json.
"""
import json, os, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from neurovfm.probe.context import CROSS_SERIES_MM, cross_series_mean
from neurovfm.probe.embed import FeatureStore
from neurovfm.probe.token_targets import read_study_masks, study_token_targets
from neurovfm.tokens.cache import TokenCache
from neurovfm.explain.maps import token_centres_ras
from neurovfm.privacy.keys import Keyer
from neurovfm.synth import tables

FEAT, CACHE, ARCH, OUT = sys.argv[1:5]
store = FeatureStore(FEAT); cache = TokenCache(CACHE); keyer = Keyer.from_site()
masks = read_study_masks(ARCH, keyer, ("train", "val"))
half = store.dim // 2
recs = [json.loads(l) for l in open(os.path.join(ARCH, "records.jsonl")) if l.strip()]
big = {}  # study key -> labels with a finding >= 10 mm
for r in recs:
    if r["split"] == "val" and tables.normalize_modality(r["modality"]) == "MR":
        labs = set()
        for f in r["findings"]:
            if f["size_mm"] >= 10:
                labs |= set(tables.close_labels("MR", [f["label"]]))
        big[keyer.study(r["study_uid"])] = labs
keys = [k for k, m in masks.items() if m.modality == "MR" and k in store.by_study]
labels = sorted({l for m in masks.values() if m.modality == "MR" for s in m.lesion_labels.values() for l in s})
print(len(keys), "MR studies;", len(labels), "labels", flush=True)

def cross(views):
    cs = [token_centres_ras(cache.get(v.series_key).grid_affine_array, v.coords) for v in views]
    base = [np.asarray(v.feats[:, :half], np.float32) for v in views]
    return np.concatenate(cross_series_mean(base, cs, [v.series_key for v in views], CROSS_SERIES_MM))

data = {}
t0 = time.time()
for n, k in enumerate(keys):
    views = store.bag_views(k)
    A = np.concatenate([np.asarray(v.feats, np.float32) for v in views])
    X = cross(views)
    T = study_token_targets(store, cache, k, masks[k], labels)
    data[k] = (masks[k].split, A, X, T)
    if n % 50 == 0:
        print(n, time.time() - t0, flush=True)
rng = np.random.default_rng(0)
tr = [k for k in keys if data[k][0] == "train"]
va = [k for k in keys if data[k][0] == "val"]
TA = np.concatenate([data[k][1] for k in tr]); TX = np.concatenate([data[k][2] for k in tr])
TT = np.concatenate([data[k][3] for k in tr])
les = TT.any(1)
other = np.flatnonzero(~les); pick = np.sort(np.concatenate([np.flatnonzero(les), rng.choice(other, 30000, replace=False)]))
res = {}
for name in ("A", "B"):
    F = TA[pick] if name == "A" else np.concatenate([TA[pick], TX[pick]], 1)
    mu, sd = F.mean(0), F.std(0) + 1e-6
    rows = {}
    for j, lab in enumerate(labels):
        y = TT[pick, j]
        if y.sum() < 20:
            continue
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=300).fit((F - mu) / sd, y)
        hits, aucs_s, ys, ss = [], [], [], []
        for k in va:
            _, A, X, T = data[k]
            Fv = A if name == "A" else np.concatenate([A, X], 1)
            s = clf.decision_function((Fv - mu) / sd)
            lesv = T.any(1)
            if lesv.any():
                ys.append(T[lesv, j]); ss.append(s[lesv])
            if lab in big.get(k, set()) and T[:, j].any():
                hits.append(float(T[np.argmax(s), j]))
        y_ = np.concatenate(ys); s_ = np.concatenate(ss)
        auc = float(roc_auc_score(y_, s_)) if 0 < y_.sum() < len(y_) else None
        rows[lab] = {"n_train_tokens": int(y.sum()), "val_trials": len(hits), "val_hits": float(sum(hits)), "auroc_among_lesions": auc}
        print(name, lab, rows[lab], flush=True)
    trials = sum(r["val_trials"] for r in rows.values()); hits = sum(r["val_hits"] for r in rows.values())
    aucs = [r["auroc_among_lesions"] for r in rows.values() if r["auroc_among_lesions"] is not None]
    res[name] = {"labels": rows, "pointing": hits / max(trials, 1), "trials": trials, "mean_auroc_among_lesions": float(np.mean(aucs))}
    print(name, "POINTING", res[name]["pointing"], trials, "AUROC among lesions", res[name]["mean_auroc_among_lesions"], flush=True)
json.dump(res, open(OUT, "w"), indent=1)
