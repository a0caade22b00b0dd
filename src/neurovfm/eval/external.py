"""`neurovfm evaluate-external`: a saved model on another hospital's studies, unchanged.

The reference head's calibration error was 0.251 on an external CT set and it flagged stroke in
more than half of the studies at its threshold. This command measures exactly that for a model
folder written by ``neurovfm evaluate --save-model``: its heads (``head_ct``, ``head_mr``), its
stored calibration and its stored per-label thresholds are applied to another site's feature
store *without refitting anything*; on that site's test split it reports macro AUROC over the
labels with >= K test positives and negatives (patient-bootstrap interval), ECE and Brier with
the home-site calibration, and the flag rate / sensitivity / specificity at the stored
thresholds. Then only the calibration map (same kind as stored) is refitted on the external
site's *validation* split, and ECE / Brier on its test split are reported again: what a site
would get by recalibrating locally before use. Labels without both classes on the external
validation split keep the home calibration.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from neurovfm.errors import NeuroVFMError
from neurovfm.eval import calibrate as cal
from neurovfm.eval import metrics as M
from neurovfm.eval.data import StudyTable, read_study_table
from neurovfm.models.folder import read_config
from neurovfm.probe.embed import FeatureStore, encoder_id
from neurovfm.probe.train import load_head, predict


class ExternalEvalError(NeuroVFMError):
    """The model folder has no usable heads, or the features do not fit them."""


@dataclass
class ExternalConfig:
    min_test_positives: int = 20  # headline labels: at least this many test positives and negatives
    bootstrap: int = 1000
    seed: int = 0
    modalities: list[str] = field(default_factory=lambda: ["CT", "MR"])
    ct_windows: list[str] | None = None  # must match what the heads were trained on (evaluate's default: all)
    check_encoder: bool = True  # refuse features of another encoder than the model folder's

    def __post_init__(self) -> None:
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")
        if self.min_test_positives < 1:
            raise ValueError("min_test_positives must be at least 1")


def _usable(y: np.ndarray) -> bool:
    m = ~np.isnan(y)
    return 0 < np.nansum(y) < m.sum()


def refit_calibration(stored: dict[str, Any], logits_val: np.ndarray, y_val: np.ndarray) -> tuple[Any, np.ndarray]:
    """A calibrator of the stored kind fitted on (external) validation logits; labels without
    both classes there keep the stored parameters. Returns it and which labels were refitted."""
    home = cal.scaler_from_dict(stored)
    new = type(home)().fit(logits_val, y_val)  # the class that fitted the stored map: refit the same way
    refit = np.array([_usable(y_val[:, j]) for j in range(y_val.shape[1])], bool)
    if isinstance(new, cal.PlattScaler):
        new.a = np.where(refit, new.a, home.a)
        new.b = np.where(refit, new.b, home.b)
    else:
        new.t = np.where(refit, new.t, home.t)
    return new, refit


def _finite(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _headline(y: np.ndarray, labels: list[str], k: int) -> list[str]:
    pos = np.nansum(y, 0)
    tot = (~np.isnan(y)).sum(0)
    return [lab for j, lab in enumerate(labels) if pos[j] >= k and tot[j] - pos[j] >= k]


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _check_features(model: str, store: FeatureStore, cfg: ExternalConfig) -> None:
    enc = os.path.join(model, "encoder.safetensors")
    if cfg.check_encoder and os.path.isfile(enc):
        have, want = store.meta.get("encoder_id"), encoder_id(model)
        if have != want:
            raise ExternalEvalError(f"{store.root}: features of encoder {str(have)[:12]}, but {model} holds encoder "
                                    f"{want[:12]}; embed the external cache with this model folder (or pass "
                                    "--no-encoder-check if the heads were fitted on other features)")
    if cfg.check_encoder:
        have = store.head_features()
        asked = {f"head_{m.lower()}" for m in cfg.modalities}  # a folder may hold heads fitted on other features
        for name, meta in read_config(model).get("heads", {}).items():
            if name not in asked:
                continue
            fitted = meta.get("features") or {}
            # (key, what it is, what None means, the embed option); a head saved before a key existed
            # was fitted on its default
            for key, what, default, option in (("readout_layers", "encoder blocks", "the last", "--layers"),
                                               ("histogram_bins", "appended histogram bins", "none",
                                                "--append-histogram"),
                                               ("context_radius", "a neighbourhood radius", "none",
                                                "--append-context"),
                                               ("cross_series_mm", "a cross-series distance (mm)", "none",
                                                "add-context --cross-series")):
                if fitted.get(key) != have.get(key):
                    raise ExternalEvalError(f"{store.root}: features with {what} {have.get(key) or default}, but "
                                            f"{model}'s {name} was fitted on {fitted.get(key) or default}; embed "
                                            f"with the same {option}")


def evaluate_modality(model: str, mod: str, store: FeatureStore, labels_csv: str, cfg: ExternalConfig
                      ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One modality's numbers on the external test split, and its predictions; None when the
    model has no head for it or the store has no study of it."""
    name = f"head_{mod.lower()}"
    if name not in (read_config(model).get("heads") or {}):
        return None
    studies = {k for k in store.studies() if store.modality(k) == mod}
    if not studies:
        return None
    head, meta = load_head(model, name)
    if int(meta["dim"]) != store.dim:
        raise ExternalEvalError(f"{store.root}: features have dim {store.dim}, head {name} of {model} expects "
                                f"{meta['dim']}")
    if not meta.get("calibration"):
        raise ExternalEvalError(f"{model}: head {name} has no stored calibration "
                                "(save it with `evaluate --save-model`)")
    labels = list(meta["labels"])
    table: StudyTable = read_study_table(labels_csv, mod, labels, studies)
    va, te = table.index("val"), table.index("test")
    if not len(te):
        raise ExternalEvalError(f"{labels_csv}: no {mod} test studies with features")
    bag = lambda i: store.bag(table.study_keys[i], cfg.ct_windows, dtype=np.float32)  # noqa: E731
    lt, _ = predict(head, [bag(i) for i in te])
    lv = predict(head, [bag(i) for i in va])[0] if len(va) else np.zeros((0, len(labels)))
    home = cal.scaler_from_dict(meta["calibration"])
    y_te, y_va = table.y[te], table.y[va]
    p_home = home.transform(lt)
    p_raw = cal.sigmoid(lt)
    if len(va):
        recal, refit = refit_calibration(meta["calibration"], lv, y_va)
    else:
        recal, refit = home, np.zeros(len(labels), bool)
    p_recal = recal.transform(lt)
    thr = np.array([meta["thresholds"].get(lab, float("inf")) for lab in labels], np.float64)
    headline = _headline(y_te, labels, cfg.min_test_positives)
    rows = []
    for j, lab in enumerate(labels):
        m = ~np.isnan(y_te[:, j])
        yj = y_te[m, j]
        pos = int(yj.sum())
        row: dict[str, Any] = {"modality": mod, "label": lab, "headline": lab in headline, "test_positives": pos,
                               "test_n": int(m.sum()), "val_positives": int(np.nansum(y_va[:, j])),
                               "val_n": int((~np.isnan(y_va[:, j])).sum()), "recalibrated": bool(refit[j]),
                               "threshold": _finite(thr[j])}
        if 0 < pos < len(yj):
            ph, pr = p_home[m, j], p_recal[m, j]
            rj = p_raw[m, j]  # discrimination on the head's own scores (calibration may be flat)
            row.update(auroc=_finite(M.auroc(yj, rj)), auprc=_finite(M.auprc(yj, rj)), prevalence=pos / len(yj),
                       ece_uncalibrated=_finite(M.ece(yj, p_raw[m, j])),
                       ece_home_calibration=_finite(M.ece(yj, ph)), ece_recalibrated=_finite(M.ece(yj, pr)),
                       brier_home_calibration=_finite(M.brier(yj, ph)), brier_recalibrated=_finite(M.brier(yj, pr)))
            for tag, pp in (("home_calibration", ph), ("recalibrated", pr)):  # what perfect calibration would score
                chk = M.calibration_check(yj, pp, seed=cfg.seed)
                row[f"ece_floor_{tag}"] = _finite(chk["ece_floor"])
                row[f"ece_p_{tag}"] = _finite(chk["p_value"])
                row[f"squared_ce_debiased_{tag}"] = _finite(chk["squared_ce_debiased"])
            st = cal.operating_stats(yj, ph, thr[j])
            row.update({f"op_{k}": (_finite(v) if isinstance(v, float) else v) for k, v in st.items()})
        elif len(yj):  # one class only: the flag rate at the stored threshold still means something
            row["op_flag_rate"] = float((p_home[m, j] >= thr[j]).mean())
        rows.append(row)
    entry: dict[str, Any] = {"head": meta["head"]["kind"], "labels_in_head": len(labels),
                             "test_studies": int(len(te)), "val_studies": int(len(va)),
                             "headline_labels": headline, "min_test_positives": cfg.min_test_positives,
                             "calibration_home": meta["calibration"], "calibration_recalibrated": recal.to_dict(),
                             "recalibrated_labels": [lab for lab, r in zip(labels, refit) if r]}
    scored = [r for r in rows if r.get("auroc") is not None]
    entry["macro_auroc_all_scored_labels"] = _mean([r["auroc"] for r in scored])
    entry["labels_scored"] = len(scored)
    for key in ("ece_uncalibrated", "ece_home_calibration", "ece_recalibrated", "brier_home_calibration",
                "brier_recalibrated"):
        entry[f"scored_{key}"] = _mean([r.get(key) for r in scored])
    if headline:
        c = np.array([labels.index(lab) for lab in headline])
        boot = M.bootstrap_ci_multilabel(y_te[:, c], p_raw[:, c], table.patients[te], M.auroc,
                                         n=cfg.bootstrap, seed=cfg.seed)
        entry["macro_auroc"] = boot["macro"]
        hl = [r for r in rows if r["headline"]]
        for key in ("ece_uncalibrated", "ece_home_calibration", "ece_recalibrated", "brier_home_calibration",
                    "brier_recalibrated", "op_flag_rate", "op_sensitivity", "op_specificity",
                    "ece_floor_home_calibration", "ece_floor_recalibrated"):
            entry[f"headline_{key}"] = _mean([r.get(key) for r in hl])
        for tag in ("home_calibration", "recalibrated"):  # root of the mean debiased square
            sq = _mean([r.get(f"squared_ce_debiased_{tag}") for r in hl])
            entry[f"headline_rmsce_debiased_{tag}"] = None if sq is None else float(np.sqrt(max(sq, 0.0)))
            entry[f"headline_miscalibrated_{tag}"] = [r["label"] for r in hl if (r.get(f"ece_p_{tag}") or 1) < 0.05]
    flagged = (p_home >= thr[None, :])
    entry["flag_rate_any_label"] = float(flagged.any(1).mean())
    preds = {"study_keys": np.array([table.study_keys[i] for i in te]), "labels": np.array(labels),
             "logits": lt, "probs_home_calibration": p_home, "probs_recalibrated": p_recal, "y": y_te,
             "thresholds": thr}
    return {"entry": entry, "rows": rows}, preds


def evaluate_external(model: str, features: str, labels_csv: str, out_dir: str, cfg: ExternalConfig | None = None,
                      home_metrics: str | None = None, home_model: str | None = None) -> dict[str, Any]:
    """Apply ``model``'s saved heads, calibration and thresholds to ``features`` (another site)."""
    cfg = cfg or ExternalConfig()
    store = FeatureStore(features)
    _check_features(model, store, cfg)
    heads = read_config(model).get("heads") or {}
    if not any(f"head_{m.lower()}" in heads for m in cfg.modalities):
        raise ExternalEvalError(f"{model}: no head_ct / head_mr (save them with `neurovfm evaluate --save-model`)")
    home = _read_home(home_metrics, home_model) if home_metrics else None
    os.makedirs(out_dir, exist_ok=True)
    summary: dict[str, Any] = {"config": asdict(cfg), "model": model, "features": features,
                               "encoder_id": store.meta.get("encoder_id"), "modalities": {}}
    rows: list[dict[str, Any]] = []
    preds_all: dict[str, dict[str, Any]] = {}
    for mod in cfg.modalities:
        res = evaluate_modality(model, mod, store, labels_csv, cfg)
        if res is None:
            continue
        out, preds = res
        summary["modalities"][mod] = out["entry"]
        rows += out["rows"]
        preds_all[mod] = preds
        np.savez(os.path.join(out_dir, f"predictions_{mod.lower()}.npz"), **preds)
        if home and mod in home["per"]:
            summary["modalities"][mod]["home"] = _home_side(home["per"][mod], out["rows"])
    if not summary["modalities"]:
        raise ExternalEvalError(f"{features}: no studies of a modality the model has a head for")
    if home:
        summary["home_metrics"] = {"path": home_metrics, "model": home["model"]}
    from neurovfm.eval.experiment import _default, _write_csv

    path = os.path.join(out_dir, "external.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=1, default=_default)
    os.replace(path + ".tmp", path)
    _write_csv(os.path.join(out_dir, "external.csv"), rows)
    plot_reliability(out_dir, summary, preds_all)
    return summary


def _read_home(path: str, model: str | None) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ExternalEvalError(f"{path}: home evaluate metrics.json not found")
    with open(path) as fh:
        m = json.load(fh)
    models = m.get("models") or {}
    if not models:
        raise ExternalEvalError(f"{path}: no models in this metrics file")
    name = model or next(iter(models))  # evaluate saves the first model's heads
    if name not in models:
        raise ExternalEvalError(f"{path}: no model {name!r} (have {sorted(models)})")
    return {"model": name, "per": models[name]}


def _home_side(e: dict[str, Any], ext_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The home evaluation's numbers, and the external AUROC over the home headline labels."""
    hl = list(e.get("headline_labels") or [])
    ext = {r["label"]: r for r in ext_rows}
    on_home = [ext[lab]["auroc"] for lab in hl if lab in ext and ext[lab].get("auroc") is not None]
    home_rows = [r for r in e.get("labels", []) if r["label"] in hl]
    return {"macro_auroc": e.get("macro_auroc"), "headline_labels": hl,
            "macro_auroc_all_scored_labels": e.get("macro_auroc_all_scored_labels"),
            "headline_ece_after": e.get("headline_ece_after"), "headline_ece_before": e.get("headline_ece_before"),
            "headline_op_flag_rate": _mean([r.get("op_flag_rate") for r in home_rows]),
            "calibration_resolution": e.get("calibration_resolution"),
            "external_macro_auroc_on_home_headline": _mean(on_home), "external_labels_scored_on_home_headline":
            len(on_home)}


def plot_reliability(out_dir: str, summary: dict[str, Any], preds: dict[str, dict[str, Any]]) -> str:
    """Per modality, reliability on the external test split (pooled over the headline labels, or
    over every label with both classes when none is headline): home calibration vs recalibrated."""
    from neurovfm.eval.plots import _plt

    plt = _plt()
    mods = list(preds)
    fig, axes = plt.subplots(1, len(mods), figsize=(4.2 * len(mods), 4), squeeze=False)
    for ax, mod in zip(axes.flat, mods):
        p, e = preds[mod], summary["modalities"][mod]
        labels = list(p["labels"])
        use = e["headline_labels"] or [lab for j, lab in enumerate(labels) if _usable(p["y"][:, j])]
        c = [labels.index(lab) for lab in use]
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
        if c:
            y = p["y"][:, c].ravel()
            for key, lab in (("probs_home_calibration", "home calibration"), ("probs_recalibrated", "recalibrated")):
                rc = M.reliability_curve(y, p[key][:, c].ravel())
                ece = M.ece(y, p[key][:, c].ravel())
                ax.plot(rc["mean_predicted"], rc["observed"], "o-", ms=3, label=f"{lab} (pooled ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{mod}: external test ({len(c)} labels pooled)")
        ax.legend(fontsize=7, loc="upper left")
    from neurovfm.eval.plots import _finish

    return _finish(plt, fig, axes, axes.size, os.path.join(out_dir, "reliability_external.png"), None)


def format_table(summary: dict[str, Any]) -> str:
    def f(x):
        return "  –  " if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"

    def ci(d):
        return f"{f(d['estimate'])} [{f(d['low'])}, {f(d['high'])}]" if d else "–"

    lines = [f"{'':34s} {'external':>28s}   {'home':>28s}"]
    for mod, e in summary["modalities"].items():
        h = e.get("home") or {}
        lines.append(f"{mod} ({e['test_studies']} external test studies, headline labels: "
                     f"{', '.join(e['headline_labels']) or 'none'})")
        rows = [("macro AUROC (headline)", ci(e.get("macro_auroc")), ci(h.get("macro_auroc"))),
                ("macro AUROC (home headline labels)", f(h.get("external_macro_auroc_on_home_headline")), ""),
                ("macro AUROC (all scored labels)", f(e.get("macro_auroc_all_scored_labels")),
                 f(h.get("macro_auroc_all_scored_labels"))),
                ("ECE, home calibration (headline)", f(e.get("headline_ece_home_calibration")),
                 f(h.get("headline_ece_after"))),
                ("ECE, recalibrated on external val", f(e.get("headline_ece_recalibrated")), ""),
                ("ECE floor if perfect: home / recal.",
                 f"{f(e.get('headline_ece_floor_home_calibration'))} / {f(e.get('headline_ece_floor_recalibrated'))}",
                 f((h.get("calibration_resolution") or {}).get("ece_floor_mean"))),
                ("debiased RMS CE: home / recal.",
                 f"{f(e.get('headline_rmsce_debiased_home_calibration'))} / "
                 f"{f(e.get('headline_rmsce_debiased_recalibrated'))}",
                 f((h.get("calibration_resolution") or {}).get("rmsce_debiased_mean"))),
                ("Brier home cal. / recalibrated", f"{f(e.get('headline_brier_home_calibration'))} / "
                 f"{f(e.get('headline_brier_recalibrated'))}", ""),
                ("ECE all scored: home cal. / recal.", f"{f(e.get('scored_ece_home_calibration'))} / "
                 f"{f(e.get('scored_ece_recalibrated'))}", ""),
                ("flag rate at stored thresholds", f(e.get("headline_op_flag_rate")),
                 f(h.get("headline_op_flag_rate"))),
                ("sensitivity / specificity", f"{f(e.get('headline_op_sensitivity'))} / "
                 f"{f(e.get('headline_op_specificity'))}", ""),
                ("studies flagged for any label", f(e.get("flag_rate_any_label")), "")]
        for name, a, b in rows:
            lines.append(f"  {name:32s} {a:>28s}   {b:>28s}")
    return "\n".join(lines)
