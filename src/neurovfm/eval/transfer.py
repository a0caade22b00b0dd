"""`neurovfm transfer`: cross-modal zero-shot transfer. A head trained on one modality's studies
only is applied, unchanged, to the other modality's test studies and scored through the
CT <-> MRI label table: if the encoder puts a finding in the same place of feature space whatever
the scanner, a CT-trained detector finds it on MRI (and the reverse) without seeing an MR label.

CT and MR tokens come from the same encoder, so a head's input width is the feature width and a
CT head reads an MR bag directly. Per feature set, one head per modality is fitted on train with
the epoch chosen on validation, over that modality's *mapped* columns: every label with a
counterpart, plus a union column wherever a label of the other modality maps to several of its
labels (positive if any of them is). Then for direction CT->MR and each CT label ``s``:

* transfer score: the CT head's output for ``s`` on the MR test studies, against the union of
  ``ct_to_mri(s)`` (and MR->CT the same way);
* reference: the MR head's output for that union column on the same MR test studies (the
  in-modality AUROC the transfer is measured against).

Nothing is fitted on any test split. Macro means are over pairs with at least
``min_test_positives`` target test positives (and a negative, and a training positive for the
source label), with 95 % intervals resampled by patient and a paired interval of transfer minus
reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from neurovfm.eval import metrics as M
from neurovfm.eval.data import StudyTable, read_study_table
from neurovfm.eval.experiment import EvaluationError, _default, _jsonable, _write_csv
from neurovfm.probe.embed import FeatureStore
from neurovfm.probe.heads import HeadConfig
from neurovfm.probe.train import HeadTrainConfig, fit_head, predict
from neurovfm.synth import tables

MODS = ("CT", "MR")
MAX_BARS = 40  # label pairs drawn per direction


@dataclass
class TransferConfig:
    """Every choice of a transfer experiment (written next to its results)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    min_test_positives: int = 20  # pairs in the macro mean
    bootstrap: int = 1000
    seed: int = 0
    ct_windows: list[str] | None = None

    def __post_init__(self) -> None:
        if self.min_test_positives < 1:
            raise ValueError("min_test_positives must be at least 1")
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")


@dataclass(frozen=True)
class Pair:
    """A source label and the target labels it maps to (scored as their union)."""

    source_modality: str
    source_label: str
    target_labels: tuple[str, ...]

    @property
    def target_modality(self) -> str:
        return other(self.source_modality)

    @property
    def direction(self) -> str:
        return f"{self.source_modality}->{self.target_modality}"


def other(mod: str) -> str:
    return "MR" if tables.normalize_modality(mod) == "CT" else "CT"


def _mapped(mod: str, label: str) -> list[str]:
    return tables.ct_to_mri(label) if mod == "CT" else tables.mri_to_ct(label)


def mapped_pairs(source_mod: str, source_labels: list[str], target_labels: list[str]) -> list[Pair]:
    """Pairs of ``source_mod``'s labels with a counterpart among ``target_labels`` (both as
    present in the labels file), target labels in the target table's order."""
    source_mod = tables.normalize_modality(source_mod)
    out = []
    for lab in source_labels:
        to = set(_mapped(source_mod, lab))
        tgt = tuple(t for t in target_labels if t in to)
        if tgt:
            out.append(Pair(source_mod, lab, tgt))
    return out


def head_columns(mod: str, tabs: dict[str, StudyTable]) -> list[tuple[str, ...]]:
    """The columns ``mod``'s head is fitted on: each of its labels that is a transfer source
    (singly), then each union needed as a transfer target or reference (once)."""
    cols: list[tuple[str, ...]] = [(p.source_label,) for p in mapped_pairs(mod, tabs[mod].labels,
                                                                         tabs[other(mod)].labels)]
    for p in mapped_pairs(other(mod), tabs[other(mod)].labels, tabs[mod].labels):
        if p.target_labels not in cols:
            cols.append(p.target_labels)
    return cols


def union_labels(table: StudyTable, columns: list[tuple[str, ...]]) -> np.ndarray:
    """[N, len(columns)]: 1 if any label of a column is 1, 0 if all are known 0, else NaN."""
    y = np.full((len(table.study_keys), len(columns)), np.nan, np.float32)
    for c, labs in enumerate(columns):
        sub = table.y[:, [table.labels.index(lab) for lab in labs]]
        pos = np.nan_to_num(sub, nan=0.0).max(1) > 0
        neg = (~np.isnan(sub)).all(1) & ~pos
        y[pos, c], y[neg, c] = 1.0, 0.0
    return y


@dataclass
class ModalityHead:
    """One modality's head over its mapped columns, fitted on train, epoch chosen on validation."""

    modality: str
    columns: list[tuple[str, ...]]
    head: torch.nn.Module
    history: list[dict[str, Any]]
    train_positives: np.ndarray  # per column


def fit_mapped_head(store: FeatureStore, table: StudyTable, columns: list[tuple[str, ...]],
                    cfg: TransferConfig) -> ModalityHead:
    tr, va = table.index("train"), table.index("val")
    for s, idx in (("train", tr), ("val", va)):
        if len(idx) == 0:
            raise EvaluationError(f"{table.modality}: no {s} studies with features")
    y = union_labels(table, columns)
    bag = lambda i: store.bag(table.study_keys[i], cfg.ct_windows, dtype=np.float32)  # noqa: E731
    head, hist = fit_head([bag(i) for i in tr], y[tr], [bag(i) for i in va], y[va], cfg.train, head_cfg=cfg.head)
    return ModalityHead(table.modality, columns, head, hist, np.nansum(y[tr], 0).astype(int))


@dataclass
class DirectionRun:
    """One direction's test scores: the source head (transfer) and the target head (reference)
    on the target modality's test studies, and the union targets they are scored against."""

    pairs: list[Pair]
    study_keys: list[str]  # target test studies
    patients: np.ndarray
    y: np.ndarray  # [N_test, P] union targets
    transfer: np.ndarray  # [N_test, P] source head logits
    reference: np.ndarray  # [N_test, P] target head logits
    source_train_positives: np.ndarray  # [P]
    source: ModalityHead  # the head that made ``transfer``


def run_direction(store: FeatureStore, tabs: dict[str, StudyTable], heads: dict[str, ModalityHead],
                  source_mod: str, cfg: TransferConfig) -> DirectionRun:
    tgt_mod = other(source_mod)
    src, tgt = heads[source_mod], heads[tgt_mod]
    pairs = mapped_pairs(source_mod, tabs[source_mod].labels, tabs[tgt_mod].labels)
    t = tabs[tgt_mod]
    te = t.index("test")
    if len(te) == 0:
        raise EvaluationError(f"{tgt_mod}: no test studies with features")
    bags = [store.bag(t.study_keys[i], cfg.ct_windows, dtype=np.float32) for i in te]
    ls, _ = predict(src.head, bags)
    lt, _ = predict(tgt.head, bags)
    s_cols = [src.columns.index((p.source_label,)) for p in pairs]
    t_cols = [tgt.columns.index(p.target_labels) for p in pairs]
    y = union_labels(t.subset(te), [p.target_labels for p in pairs])
    return DirectionRun(pairs, [t.study_keys[i] for i in te], t.patients[te], y,
                        np.asarray(ls, np.float64)[:, s_cols], np.asarray(lt, np.float64)[:, t_cols],
                        src.train_positives[s_cols], src)


def fit_feature_set(store: FeatureStore, tabs: dict[str, StudyTable], cfg: TransferConfig
                    ) -> dict[str, DirectionRun]:
    """Both heads of one feature set, then both directions: {"CT->MR": ..., "MR->CT": ...}."""
    heads = {m: fit_mapped_head(store, tabs[m], head_columns(m, tabs), cfg) for m in MODS}
    return {f"{m}->{other(m)}": run_direction(store, tabs, heads, m, cfg) for m in MODS}


def _finite(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def summarize(run: DirectionRun, cfg: TransferConfig) -> dict[str, Any]:
    """Per pair: transfer and reference AUROC with patient-bootstrap intervals; macro over the
    pairs with enough target test positives."""
    pos = np.nansum(run.y, 0).astype(int)
    n = (~np.isnan(run.y)).sum(0)
    scoreable = (pos > 0) & (pos < n)
    in_macro = scoreable & (pos >= cfg.min_test_positives) & (run.source_train_positives > 0)
    rows = []
    cols = np.flatnonzero(scoreable)
    ci_t = ci_r = None
    if len(cols):
        ci_t = M.bootstrap_ci_multilabel(run.y[:, cols], run.transfer[:, cols], run.patients, M.auroc,
                                         n=cfg.bootstrap, seed=cfg.seed)["per_label"]
        ci_r = M.bootstrap_ci_multilabel(run.y[:, cols], run.reference[:, cols], run.patients, M.auroc,
                                         n=cfg.bootstrap, seed=cfg.seed)["per_label"]
    where = {c: k for k, c in enumerate(cols)}
    for j, p in enumerate(run.pairs):
        r: dict[str, Any] = {"direction": p.direction, "source_label": p.source_label,
                             "target_labels": list(p.target_labels),
                             "source_train_positives": int(run.source_train_positives[j]),
                             "target_test_positives": int(pos[j]), "target_test_n": int(n[j]),
                             "in_macro": bool(in_macro[j]), "auroc": None, "auroc_low": None, "auroc_high": None,
                             "reference_auroc": None, "reference_low": None, "reference_high": None}
        if j in where:
            a, b = ci_t[where[j]], ci_r[where[j]]
            r.update(auroc=_finite(a["estimate"]), auroc_low=_finite(a["low"]), auroc_high=_finite(a["high"]),
                     reference_auroc=_finite(b["estimate"]), reference_low=_finite(b["low"]),
                     reference_high=_finite(b["high"]))
        rows.append(r)
    out: dict[str, Any] = {"pairs": rows, "test_studies": len(run.study_keys),
                           "macro_pairs": [p.source_label for p, m in zip(run.pairs, in_macro) if m]}
    mc = np.flatnonzero(in_macro)
    if len(mc):
        y, g = run.y[:, mc], run.patients
        out["macro_auroc"] = M.bootstrap_ci_multilabel(y, run.transfer[:, mc], g, n=cfg.bootstrap,
                                                       seed=cfg.seed)["macro"]
        out["reference_macro_auroc"] = M.bootstrap_ci_multilabel(y, run.reference[:, mc], g, n=cfg.bootstrap,
                                                                 seed=cfg.seed)["macro"]
        out["transfer_minus_reference"] = M.paired_bootstrap(y, run.transfer[:, mc], run.reference[:, mc], g,
                                                             n=cfg.bootstrap, seed=cfg.seed)
    return out


def read_tables(labels_csv: str, store_studies: dict[str, set[str]]) -> dict[str, StudyTable]:
    tabs = {}
    for m in MODS:
        if not store_studies.get(m):
            raise EvaluationError(f"transfer needs both CT and MR studies; the features have no {m} study")
        tabs[m] = read_study_table(labels_csv, m, None, store_studies[m])
    if not mapped_pairs("CT", tabs["CT"].labels, tabs["MR"].labels):
        raise EvaluationError(f"{labels_csv}: no CT label column with an MRI counterpart column")
    return tabs


def transfer(features: dict[str, str], labels_csv: str, out_dir: str, cfg: TransferConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the experiment for each named feature folder on their common studies; write
    ``transfer.json``, ``transfer.csv`` and ``transfer.png`` into ``out_dir``."""
    cfg = cfg or TransferConfig()
    if not features:
        raise EvaluationError("no feature folders given")
    stores = {n: FeatureStore(p) for n, p in features.items()}
    first = next(iter(stores))
    common = set.intersection(*(set(s.studies()) for s in stores.values()))
    by_mod = {m: {k for k in common if stores[first].modality(k) == m} for m in MODS}
    tabs = read_tables(labels_csv, by_mod)
    summary: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "results": {},
                               "features": {n: {"encoder_id": s.meta["encoder_id"], "path": features[n]}
                                            for n, s in stores.items()}}
    rows: list[dict[str, Any]] = []
    for name, store in tqdm(stores.items(), desc="transfer", disable=not progress):
        runs = fit_feature_set(store, tabs, cfg)
        summary["results"][name] = {d: summarize(r, cfg) for d, r in runs.items()}
        for d, s in summary["results"][name].items():
            rows += [{"features": name, **r} for r in s["pairs"]]
    os.makedirs(out_dir, exist_ok=True)
    for r in rows:
        r["target_labels"] = "|".join(r["target_labels"])
    summary["plot"] = os.path.basename(plot(summary, os.path.join(out_dir, "transfer.png")))
    tmp = os.path.join(out_dir, "transfer.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1, default=_default)
    os.replace(tmp, os.path.join(out_dir, "transfer.json"))
    _write_csv(os.path.join(out_dir, "transfer.csv"), rows)
    return summary


def plot(summary: dict[str, Any], path: str) -> str:
    """Bars per label pair (one panel per direction), one bar per feature set with its 95 %
    interval; a black tick marks the in-modality reference head's AUROC."""
    from neurovfm.eval.plots import _finish, _plt

    plt = _plt()
    res = summary["results"]
    names = list(res)
    dirs = [f"{m}->{other(m)}" for m in MODS]
    shown, ticks = {}, {}
    for d in dirs:  # pairs scored for some feature set; most target positives first
        pairs: dict[str, int] = {}
        for n in names:
            for r in res[n][d]["pairs"]:
                if r["auroc"] is not None:
                    pairs[r["source_label"]] = r["target_test_positives"]
                src = r["source_label"]
                ticks[d, src] = (src if len(src) <= 30 else src[:29] + "~") + \
                    ("" if r["target_labels"] == [src] else "*")
        shown[d] = sorted(pairs, key=lambda k: (-pairs[k], k))[:MAX_BARS]
    width = max(7.0, 0.22 * max(1, max(len(v) for v in shown.values())) * max(1, len(names)) + 3)
    fig, axes = plt.subplots(len(dirs), 1, figsize=(width, 4.0 * len(dirs)), squeeze=False)
    bw = 0.8 / max(1, len(names))
    for ax, d in zip(axes[:, 0], dirs):
        labs = shown[d]
        x = np.arange(len(labs))
        for k, n in enumerate(names):
            by = {r["source_label"]: r for r in res[n][d]["pairs"]}
            rs = [by.get(lab) or {} for lab in labs]
            v = np.array([r.get("auroc") if r.get("auroc") is not None else np.nan for r in rs], float)
            lo = np.array([r.get("auroc_low") if r.get("auroc_low") is not None else np.nan for r in rs], float)
            hi = np.array([r.get("auroc_high") if r.get("auroc_high") is not None else np.nan for r in rs], float)
            ref = np.array([r.get("reference_auroc") if r.get("reference_auroc") is not None else np.nan
                            for r in rs], float)
            xs = x - 0.4 + bw * (k + 0.5)
            mac = (res[n][d].get("macro_auroc") or {}).get("estimate")
            legend = n + (f" (macro {mac:.2f})" if mac is not None else "")
            err = np.clip(np.nan_to_num(np.vstack([v - lo, hi - v])), 0, None)
            ax.bar(xs, np.nan_to_num(v - 0.5), bw, bottom=0.5, label=legend, yerr=err, error_kw={"lw": 0.6})
            ax.scatter(xs, ref, marker="_", s=60, color="k", zorder=3,
                       label="in-modality reference" if k == 0 else None)
        ax.axhline(0.5, color="k", ls=":", lw=0.6)
        ax.set_ylim(0, 1)
        ax.set_xticks(x)
        ax.set_xticklabels([ticks[d, lab].replace("_", " ") for lab in labs], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(f"AUROC on {d[-2:]} test")
        ax.set_title(f"{d}: head trained on {d[:2]} studies only; x: {d[:2]} label "
                     f"(* scored against differently named {d[-2:]} label(s), see transfer.csv)", fontsize=8)
        if not labs:
            ax.text(0.5, 0.5, "no pair with both classes on test", ha="center", transform=ax.transAxes)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(plt, fig, axes, len(dirs), path, "Cross-modal zero-shot transfer (95 % patient-bootstrap intervals)")


def summary_table(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: macro transfer vs reference AUROC per feature set and direction."""
    def ci(d: dict[str, Any] | None) -> str:
        return "-" if not d else f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    lines = [f"{'features':<14}{'direction':<10}{'pairs':>6}  {'transfer AUROC':<24}{'in-modality AUROC':<24}"]
    for n, per in summary["results"].items():
        for d, s in per.items():
            lines.append(f"{n:<14}{d:<10}{len(s['macro_pairs']):>6}  {ci(s.get('macro_auroc')):<24}"
                         f"{ci(s.get('reference_macro_auroc')):<24}")
    return "\n".join(lines)
