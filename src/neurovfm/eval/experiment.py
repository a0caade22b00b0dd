"""`neurovfm evaluate`: study-level diagnosis from frozen features, evaluated the way a reviewer
would: heads fitted on train, every choice (epoch, calibration, thresholds) made on validation,
every number reported on test with patient-bootstrap intervals, calibrated, triaged, broken down.

One call evaluates one or more feature folders (a pretrained encoder, a random-init encoder of
the same architecture, the histogram baseline) on the same studies and compares the first with
each other by a paired bootstrap over the same patient resamples.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError
from neurovfm.eval import calibrate as cal
from neurovfm.eval import metrics as M
from neurovfm.eval.data import StudyTable, add_series_meta, read_study_table
from neurovfm.probe.cnn3d import CNNConfig
from neurovfm.probe.embed import FeatureStore, encoder_id
from neurovfm.probe.heads import HEADS, HeadConfig, HeadEnsemble
from neurovfm.probe.token_targets import token_targets
from neurovfm.probe.train import (HeadTrainConfig, fit_ensemble, fit_head, predict, predict_members, save_head,
                                   val_macro_auroc)
from neurovfm.pretrain.data import KIND_SOFT
from neurovfm.synth import tables
from neurovfm.tokens.cache import TokenCache

BREAKDOWNS = ("site", "kernel", "thickness", "plane", "age_band", "sex")


class EvaluationError(NeuroVFMError):
    """Features and labels do not fit together, or a split is empty."""


HEAD_KINDS = tuple(HEADS)  # gated, abmil, mean, topk


@dataclass
class EvalConfig:
    """Every choice of an evaluation, in one place (and written next to its results)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    calibration: str = "platt"  # platt | temperature | shrunk-platt
    target_sensitivity: float = 0.90  # per-label operating point chosen on validation
    min_test_positives: int = 20  # headline labels
    bootstrap: int = 1000
    seed: int = 0
    modalities: list[str] = field(default_factory=lambda: ["CT", "MR"])
    ct_windows: list[str] | None = None
    comparator_flag_rate: float | None = None  # urgent flag rate of a stated comparator
    comparator_name: str = "validation urgent prevalence"
    gallery: int = 4
    head_auto: bool = False  # fit every head kind, keep each model's best on validation
    ood_components: int = 16  # distance-to-training model saved with --save-model
    ood_quantile: float = 0.99
    cnn: CNNConfig | None = None  # also fit the end-to-end 3-D CNN baseline (needs the cache)
    token_masks: str | None = None  # lesion masks of training studies (records.jsonl layout): a token term

    def __post_init__(self) -> None:
        if self.calibration not in cal.CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(cal.CALIBRATIONS)}, not {self.calibration!r}")
        if not 0 < self.target_sensitivity < 1:
            raise ValueError("target_sensitivity must be in (0, 1)")
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")


@dataclass
class ModalityRun:
    """What one feature folder gives on one modality: test probabilities and everything derived."""

    name: str
    table: StudyTable
    test_idx: np.ndarray
    logits_test: np.ndarray
    probs_test: np.ndarray  # calibrated: calibration metrics, thresholds, triage
    probs_test_raw: np.ndarray  # sigmoid of the uncalibrated logits
    probs_val: np.ndarray
    thresholds: np.ndarray
    attn_nonbrain: np.ndarray  # per test study, share of head attention on air/bone tokens
    history: list[dict[str, Any]]
    head: Any
    calibrator: Any
    head_cfg: HeadConfig | None = None  # the head kind used (chosen on validation with --head auto)
    member_logits_test: np.ndarray | None = None  # [members, N, C] of a head ensemble (seed spread)
    token_supervision: dict[str, Any] | None = None  # what the token term saw (--token-masks)

    @property
    def scores_test(self) -> np.ndarray:
        """The head's own ranking (sigmoid of its logits): discrimination metrics (AUROC, AUPRC,
        paired comparisons) use this, so they describe the head whatever calibration follows."""
        return self.probs_test_raw


def _bags(store: FeatureStore, keys: list[str], windows: list[str] | None) -> list[np.ndarray]:
    return [store.bag(k, windows, dtype=np.float32) for k in keys]


def fit_modality(name: str, store: FeatureStore, table: StudyTable, cfg: EvalConfig,
                 cache_dir: str | None = None) -> ModalityRun:
    tr, va, te = (table.index(s) for s in ("train", "val", "test"))
    for s, idx in (("train", tr), ("val", va), ("test", te)):
        if len(idx) == 0:
            raise EvaluationError(f"{table.modality}: no {s} studies with features")
    bags = _bags(store, table.study_keys, cfg.ct_windows)
    targets, supervision = None, None
    if cfg.token_masks:  # training studies only: validation and test never see a mask
        if not cache_dir:
            raise EvaluationError("--token-masks maps lesion masks onto the token grid: give --cache")
        targets = token_targets(store, cache_dir, cfg.token_masks, [table.study_keys[i] for i in tr], table.labels,
                                cfg.ct_windows)
        supervision = {"train_studies_with_masks": sum(t is not None for t in targets),
                       "train_studies": len(tr), "weight": cfg.train.token_weight,
                       "balance": cfg.train.token_balance,
                       "lesion_tokens_per_label": {lab: int(sum(int(t[:, j].sum()) for t in targets if t is not None))
                                                   for j, lab in enumerate(table.labels)}}
    head_cfg, head, history = None, None, []
    # "auto": every head kind is fitted and the one with the best *validation* macro AUROC kept,
    # so each feature set is judged with its own best head and the test split never chooses
    # (with an ensemble, on its first member: the other seeds are trained for the chosen kind only)
    kinds = HEAD_KINDS if cfg.head_auto else (cfg.head.kind,)
    train_b, val_b, test_b = [bags[i] for i in tr], [bags[i] for i in va], [bags[i] for i in te]
    best = -np.inf
    for kind in kinds:
        hc = replace(cfg.head, kind=kind, ensemble=1)
        h, hist = fit_head(train_b, table.y[tr], val_b, table.y[va], cfg.train, head_cfg=hc, token_targets=targets)
        score = max((r["val_macro_auroc"] for r in hist if np.isfinite(r["val_macro_auroc"])), default=-np.inf)
        if head is None or score > best:
            best, head_cfg, head, history = score, hc, h, hist
    member_logits = None
    if cfg.head.ensemble > 1:
        head_cfg = replace(head_cfg, ensemble=cfg.head.ensemble)
        head, history = fit_ensemble(train_b, table.y[tr], val_b, table.y[va], cfg.train, head_cfg,
                                     first=(head, history), token_targets=targets)
    lv, _ = predict(head, val_b)
    if isinstance(head, HeadEnsemble):  # each member predicts the test bags once
        lt, attn, member_logits = predict_members(head, test_b)
    else:
        lt, attn = predict(head, test_b)
    nonbrain = []
    for a, i in zip(attn, te):
        kinds = store.bag_kinds(table.study_keys[i], cfg.ct_windows)
        a = np.asarray(a, np.float64)  # [n_tokens, C], sums to one per class
        nonbrain.append(float(a[kinds != KIND_SOFT].sum(0).mean()))
    run = _calibrated_run(name, table, lv, lt, np.array(nonbrain), history, head, head_cfg, cfg)
    run.member_logits_test = member_logits
    run.token_supervision = supervision
    return run


def _calibrated_run(name: str, table: StudyTable, lv, lt, nonbrain: np.ndarray, history: list, head, head_cfg,
                    cfg: EvalConfig) -> ModalityRun:
    """Validation and test logits -> calibration (fitted on validation), per-label operating points
    (chosen on validation), calibrated test probabilities: the same for every model."""
    va, te = table.index("val"), table.index("test")
    lv, lt = np.asarray(lv, np.float64), np.asarray(lt, np.float64)
    scaler = cal.make_scaler(cfg.calibration, cfg.seed)
    scaler.fit(lv, table.y[va])
    pv, pt = scaler.transform(lv), scaler.transform(lt)
    thr = np.array([cal.threshold_for_sensitivity(table.y[va][:, j], pv[:, j], cfg.target_sensitivity)
                    for j in range(len(table.labels))])
    return ModalityRun(name, table, te, lt, pt, cal.sigmoid(lt), pv, thr, nonbrain, history, head, scaler, head_cfg)


CNN_NAME = "cnn3d"


def cnn_head_name(cnn) -> str:
    """How the CNN baseline is named in the metrics: an ensemble says how many networks it averages,
    and anti-aliased inputs and a grid finer or coarser than 3 mm are named (the same network
    scores differently on them)."""
    return ("3-D CNN, end to end" + (", anti-aliased inputs" if cnn and cnn.antialias else "")
            + (f", {cnn.inplane_mm:g} mm grid" if cnn and cnn.inplane_mm != 3.0 else "")
            + (f" (mean logit of {cnn.ensemble} seeds)" if cnn and cnn.ensemble > 1 else ""))


def head_name(hc: HeadConfig) -> str:
    """How a head is named in the metrics: an ensemble says how many seeds it averages, and
    standardised features are named (the same features score differently with and without)."""
    return (hc.kind + (", standardised features" if hc.standardize else "")
            + (f" (mean logit of {hc.ensemble} seeds)" if hc.ensemble > 1 else ""))


def fit_cnn_modality(table: StudyTable, cache_dir: str, cfg: EvalConfig, progress: bool = True) -> ModalityRun:
    """The end-to-end 3-D CNN baseline on the same studies, splits and labels as the heads; scored
    through the same calibration and operating points (``neurovfm.probe.cnn3d``)."""
    from neurovfm.probe import cnn3d

    assert cfg.cnn is not None
    tr, va, te = (table.index(s) for s in ("train", "val", "test"))
    cache = TokenCache(cache_dir)
    try:
        vols = cnn3d.study_volumes(cache, table.study_keys, cfg.cnn.antialias, cfg.cnn.grid)
    finally:
        cache.close()
    missing = [k for k in table.study_keys if k not in vols]
    if missing:
        raise EvaluationError(f"{cache_dir}: {len(missing)} {table.modality} studies of the features are not in "
                              f"this cache (e.g. {missing[0][:12]}…): give the cache the features were embedded from")
    keys = table.study_keys
    res = cnn3d.train_cnn({k: vols[k][0] for k in keys}, {k: vols[k][1] for k in keys},
                          {k: table.y[i] for i, k in enumerate(keys)}, [keys[i] for i in tr], [keys[i] for i in va],
                          [keys[i] for i in np.concatenate([va, te])], cfg.cnn,
                          log=(lambda m: print(f"{table.modality}{m}", file=sys.stderr)) if progress else None)
    lv = np.stack([res.logits[keys[i]] for i in va])
    lt = np.stack([res.logits[keys[i]] for i in te])
    return _calibrated_run(CNN_NAME, table, lv, lt, np.full(len(te), np.nan), res.history, None, None, cfg)


def save_distance_model(folder: str, mod: str, store: FeatureStore, table: StudyTable, cfg: EvalConfig) -> None:
    """Distance-to-training for ``analyze``'s out-of-distribution warning: fitted on the training
    studies' mean features, threshold at a quantile of the validation studies' scores."""
    from neurovfm.analyze.ood import fit_ood, save_ood

    tr = np.stack([store.bag(table.study_keys[i], cfg.ct_windows).mean(0) for i in table.index("train")])
    va = np.stack([store.bag(table.study_keys[i], cfg.ct_windows).mean(0) for i in table.index("val")])
    save_ood(folder, mod, fit_ood(tr, va, k=cfg.ood_components, quantile=cfg.ood_quantile))


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def label_metrics(run: ModalityRun, cfg_seed: int = 0) -> list[dict[str, Any]]:
    """Per-label test metrics; the calibration columns come with the plug-in ECE's floor at
    this test size (what a perfectly calibrated model would score) and a test against it."""
    t = run.table
    y = t.y[run.test_idx]
    out = []
    for j, lab in enumerate(t.labels):
        m = ~np.isnan(y[:, j])
        yj, pj, rj = y[m, j], run.probs_test[m, j], run.probs_test_raw[m, j]
        pos = int(yj.sum())
        row: dict[str, Any] = {"label": lab, "test_positives": pos, "test_n": int(m.sum()),
                               "val_positives": int(np.nansum(t.y[t.index('val'), j])),
                               "train_positives": int(np.nansum(t.y[t.index('train'), j]))}
        if 0 < pos < len(yj):
            row.update(auroc=_finite(M.auroc(yj, rj)), auprc=_finite(M.auprc(yj, rj)),
                       prevalence=pos / len(yj),
                       ece_before=_finite(M.ece(yj, rj)), ece_after=_finite(M.ece(yj, pj)),
                       brier_before=_finite(M.brier(yj, rj)), brier_after=_finite(M.brier(yj, pj)))
            chk = M.calibration_check(yj, pj, seed=cfg_seed)
            row.update(ece_after_floor=_finite(chk["ece_floor"]), ece_after_null_q95=_finite(chk["ece_null_q95"]),
                       ece_after_p=_finite(chk["p_value"]), rmsce_after_debiased=_finite(chk["rmsce_debiased"]),
                       squared_ce_after_debiased=_finite(chk["squared_ce_debiased"]))
            st = cal.operating_stats(yj, pj, run.thresholds[j])
            row.update({f"op_{k}": _finite(v) if isinstance(v, float) else v for k, v in st.items()})
            row["threshold"] = _finite(run.thresholds[j])
        out.append(row)
    return out


def prediction_rows(run: ModalityRun) -> list[dict[str, Any]]:
    """Every test probability, long format, so a reviewer can recompute any number: keyed study
    and patient hashes only (the same keys as the cache), truth, raw and calibrated probability,
    and the decision at the label's validation threshold."""
    t = run.table
    y = t.y[run.test_idx]
    out = []
    for r, i in enumerate(run.test_idx):
        for j, lab in enumerate(t.labels):
            if np.isnan(y[r, j]):
                continue
            out.append({"model": run.name, "modality": t.modality, "study": t.study_keys[i],
                        "patient": str(t.patients[i]), "label": lab, "truth": int(y[r, j]),
                        "prob_raw": round(float(run.probs_test_raw[r, j]), 6),
                        "prob_calibrated": round(float(run.probs_test[r, j]), 6),
                        "decision": int(run.probs_test[r, j] >= run.thresholds[j])})
    return out


def headline_labels(run: ModalityRun, min_pos: int) -> list[str]:
    y = run.table.y[run.test_idx]
    n = np.nansum(y, 0)
    tot = (~np.isnan(y)).sum(0)
    return [lab for j, lab in enumerate(run.table.labels) if n[j] >= min_pos and tot[j] - n[j] >= min_pos]


def _cols(run: ModalityRun, labels: list[str]) -> np.ndarray:
    return np.array([run.table.labels.index(lab) for lab in labels], int)


def bootstrap_macro(run: ModalityRun, labels: list[str], cfg: EvalConfig) -> dict[str, Any]:
    c = _cols(run, labels)
    y = run.table.y[run.test_idx][:, c]
    p = run.scores_test[:, c]
    groups = run.table.patients[run.test_idx]
    res = M.bootstrap_ci_multilabel(y, p, groups, M.auroc, n=cfg.bootstrap, seed=cfg.seed)
    return res


def member_spread(run: ModalityRun, labels: list[str]) -> dict[str, Any]:
    """Test macro AUROC over ``labels`` of each member of a head ensemble (seed ``seed + m``) and of
    their mean logit: how far the seed of a head alone moves the headline number."""
    c = _cols(run, labels)
    y = run.table.y[run.test_idx][:, c]
    members = [val_macro_auroc(y, lg[:, c]) for lg in run.member_logits_test]
    return {"seeds": len(members), "member_macro_auroc": members, "member_mean": float(np.mean(members)),
            "member_sd": float(np.std(members, ddof=1)) if len(members) > 1 else None,
            "member_range": [float(min(members)), float(max(members))],
            "ensemble_macro_auroc": val_macro_auroc(y, run.logits_test[:, c])}


def triage_summary(run: ModalityRun, cfg: EvalConfig) -> dict[str, Any]:
    t = run.table
    acuity = {lab: tables.acuity(t.modality, lab) for lab in t.labels}
    urgent = [lab for lab in t.labels if acuity[lab] == "Urgent"]
    if not urgent:
        return {}
    cols = _cols(run, urgent)
    y_test = t.y[run.test_idx][:, cols]
    is_urgent = np.nan_to_num(y_test).max(1) > 0
    score = cal.urgent_score(run.probs_test, t.labels, acuity)
    va = t.index("val")
    val_urgent = np.nan_to_num(t.y[va][:, cols]).max(1) > 0
    rate = cfg.comparator_flag_rate if cfg.comparator_flag_rate is not None else float(val_urgent.mean())
    score_val = cal.urgent_score(run.probs_val, t.labels, acuity)
    matched = cal.sensitivity_at_matched_flag_rate(is_urgent, score, score_val, rate)
    levels = cal.triage_levels(run.probs_test, t.labels, dict(zip(t.labels, run.thresholds)), acuity)
    truth = []
    for i in run.test_idx:
        have = [lab for j, lab in enumerate(t.labels) if t.y[i, j] == 1]
        truth.append(tables.triage(t.modality, have))
    levels = list(levels)
    agree = float(np.mean([a == b for a, b in zip(levels, truth)]))
    urgent_sens = float(np.mean([lv == "Urgent" for lv, tr in zip(levels, truth) if tr == "Urgent"])) \
        if "Urgent" in truth else None
    return {"urgent_labels": urgent, "urgent_auroc": _finite(M.auroc(is_urgent.astype(float), score))
            if 0 < is_urgent.sum() < len(is_urgent) else None,
            "comparator": cfg.comparator_name, "comparator_flag_rate": rate, "at_matched_flag_rate": matched,
            "level_agreement": agree, "urgent_sensitivity_at_label_thresholds": urgent_sens,
            "flag_rate_at_label_thresholds": float(np.mean([lv == "Urgent" for lv in levels])),
            "levels": {lv: int(sum(x == lv for x in levels)) for lv in ("Urgent", "Routine", "Normal")}}


def breakdowns(run: ModalityRun, labels: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Macro AUROC over the headline labels within each group (labels with both classes there)."""
    c = _cols(run, labels)
    y = run.table.y[run.test_idx][:, c]
    p = run.scores_test[:, c]
    out: dict[str, list[dict[str, Any]]] = {}
    for key in BREAKDOWNS:
        if key not in run.table.meta:
            continue
        vals = run.table.meta[key][run.test_idx]
        rows = []
        for g in sorted(set(vals.tolist()), key=str):
            m = vals == g
            aucs = [M.auroc(y[m, j], p[m, j]) for j in range(len(c))
                    if 0 < np.nansum(y[m, j]) < (~np.isnan(y[m, j])).sum()]
            aucs = [a for a in aucs if np.isfinite(a)]
            rows.append({"group": str(g), "studies": int(m.sum()),
                         "macro_auroc": float(np.mean(aucs)) if aucs else None, "labels_scored": len(aucs)})
        out[key] = rows
    return out


def check_model_for_features(model: str, store: FeatureStore, name: str) -> None:
    """Heads saved into ``model`` must have been fitted on features of ``model``'s own encoder
    (``analyze`` feeds them that encoder's tokens); checked before any head is trained."""
    enc = os.path.join(model, "encoder.safetensors")
    ident = store.meta.get("encoder_id", "")
    if not os.path.isfile(enc):
        raise EvaluationError(f"--save-model {model}: no encoder.safetensors there; save heads into the model "
                              f"folder whose encoder made the {name!r} features (e.g. the pretraining run's "
                              "exported model)")
    have = encoder_id(model)
    if have != ident:
        raise EvaluationError(f"--save-model {model}: its encoder ({have[:12]}) did not make the {name!r} "
                              f"features ({store.root}: {str(ident)[:12]}); heads fitted on them would be fed "
                              "another encoder's tokens by `analyze`")


def evaluate(features: dict[str, str], labels_csv: str, out_dir: str, cfg: EvalConfig | None = None,
             cache_dir: str | None = None, label_names: dict[str, list[str]] | None = None,
             save_model: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate each named feature folder; the first is compared with every other one."""
    from neurovfm.eval import plots

    cfg = cfg or EvalConfig()
    if not features:
        raise EvaluationError("no feature folders given")
    if cfg.cnn is not None and not cache_dir:
        raise EvaluationError("the 3-D CNN baseline trains on the scans: give --cache")
    if CNN_NAME in features and cfg.cnn is not None:
        raise EvaluationError(f"--features: {CNN_NAME!r} is the name of the CNN baseline; rename that feature set")
    stores = {n: FeatureStore(p) for n, p in features.items()}
    first = next(iter(stores))
    if save_model:
        check_model_for_features(save_model, stores[first], first)
    common = set.intersection(*(set(s.studies()) for s in stores.values()))
    os.makedirs(out_dir, exist_ok=True)
    summary: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "models": {}, "comparisons": {},
                               "features": {n: {**s.head_features(), "path": features[n]} for n, s in stores.items()}}
    rows_csv = []
    pred_rows: list[dict[str, Any]] = []
    for mod in cfg.modalities:
        studies = {k for k in common if stores[first].modality(k) == mod}
        if not studies:
            continue
        table = read_study_table(labels_csv, mod, (label_names or {}).get(mod), studies)
        if cache_dir:
            add_series_meta(table, cache_dir)
        runs: dict[str, ModalityRun] = {}
        for name, store in tqdm(stores.items(), desc=f"heads {mod}", disable=not progress):
            runs[name] = fit_modality(name, store, table, cfg, cache_dir)
        if cfg.cnn is not None:
            runs[CNN_NAME] = fit_cnn_modality(table, cache_dir, cfg, progress)
        headline = headline_labels(runs[first], cfg.min_test_positives)
        for name, run in runs.items():
            lm = label_metrics(run, cfg.seed)
            for r in lm:
                rows_csv.append({"model": name, "modality": mod, "headline": r["label"] in headline, **r})
            kind = cnn_head_name(cfg.cnn) if name == CNN_NAME else head_name(run.head_cfg or cfg.head)
            entry = {"labels": lm, "headline_labels": headline, "head": kind,
                     "test_studies": int(len(run.test_idx)), "history": run.history,
                     "attention_on_nonbrain_tokens": _finite(float(np.mean(run.attn_nonbrain))),
                     "triage": triage_summary(run, cfg), "breakdowns": breakdowns(run, headline) if headline else {}}
            if run.token_supervision is not None:
                entry["token_supervision"] = run.token_supervision
            if headline:
                boot = bootstrap_macro(run, headline, cfg)
                entry["macro_auroc"] = boot["macro"]
                entry["macro_auroc_per_label_ci"] = boot["per_label"]
                hl = [r for r in lm if r["label"] in headline]
                entry["headline_ece_after"] = float(np.mean([r["ece_after"] for r in hl]))
                entry["headline_ece_before"] = float(np.mean([r["ece_before"] for r in hl]))
                entry["headline_ece_after_max"] = float(np.max([r["ece_after"] for r in hl]))
                c = _cols(run, headline)
                res = M.calibration_resolution(run.table.y[run.test_idx][:, c], run.probs_test[:, c], headline, cfg.seed)
                entry["calibration_resolution"] = {k: _finite(v) if isinstance(v, float) else v for k, v in res.items()}
                if run.member_logits_test is not None:
                    entry["head_members"] = member_spread(run, headline)
            pred_rows += prediction_rows(run)
            all_scored = [r["auroc"] for r in lm if r.get("auroc") is not None]
            entry["macro_auroc_all_scored_labels"] = float(np.mean(all_scored)) if all_scored else None
            summary["models"].setdefault(name, {})[mod] = entry
        if headline:
            base = runs[first]
            c = _cols(base, headline)
            y = table.y[base.test_idx][:, c]
            groups = table.patients[base.test_idx]
            for name, run in runs.items():
                if name == first:
                    continue
                d = M.paired_bootstrap(y, base.scores_test[:, c], run.scores_test[:, c], groups, M.auroc,
                                       n=cfg.bootstrap, seed=cfg.seed)
                summary["comparisons"].setdefault(f"{first} - {name}", {})[mod] = d
        plots.write_modality_plots(out_dir, mod, runs, headline, cfg)
        if cache_dir and headline:
            cache = TokenCache(cache_dir)
            try:
                summary.setdefault("galleries", {})[mod] = plots.write_galleries(out_dir, mod, runs[first], headline,
                                                                                 cache, cfg.gallery)
            finally:
                cache.close()
        if save_model and first in runs:
            r = runs[first]
            save_head(save_model, r.head, r.head_cfg or cfg.head, table.labels, calibration=r.calibrator.to_dict(),
                      thresholds={lab: float(t) for lab, t in zip(table.labels, r.thresholds)},
                      name=f"head_{mod.lower()}",
                      features=stores[first].head_features())
            save_distance_model(save_model, mod, stores[first], table, cfg)
    with open(os.path.join(out_dir, "metrics.json.tmp"), "w") as fh:
        json.dump(summary, fh, indent=1, default=_default)
    os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))
    _write_csv(os.path.join(out_dir, "metrics.csv"), rows_csv)
    _write_csv(os.path.join(out_dir, "predictions.csv"), pred_rows)
    plots.write_html(out_dir, summary)
    return summary


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=_default))


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    import csv

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
