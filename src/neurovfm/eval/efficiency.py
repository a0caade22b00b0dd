"""`neurovfm label-efficiency`: test AUROC against the number of positive training studies per
label. A foundation model's promise is that few labelled cases suffice; this measures it, for
each feature set on the same subsamples, so a pretrained encoder's curve can be set against the
random-init and histogram baselines' at 1, 2, 4, ... positives.

For each repeat and label the training positives are put in a random order fixed by
(seed, repeat, label name); a budget of ``n`` keeps the first ``n`` of them and masks the
others as unknown (NaN, never as negative), so subsamples are nested, identical across feature
sets, and the budget ``all`` is exactly the full training split. Every training negative is
kept. The epoch is chosen on the full validation split; AUROC is on test only, as a macro mean
over a label set fixed per modality (labels with a training positive, at least
``min_test_positives`` test positives and a test negative), so points along a curve are
comparable.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from neurovfm.eval import metrics as M
from neurovfm.eval.data import StudyTable, read_study_table
from neurovfm.eval.experiment import EvaluationError, _default, _jsonable, _write_csv
from neurovfm.probe.embed import FeatureStore
from neurovfm.probe.heads import HeadConfig
from neurovfm.probe.train import HeadTrainConfig, fit_head, predict
from neurovfm.synth import tables

DEFAULT_POSITIVES: tuple[int | None, ...] = (1, 2, 4, 8, 16, 32, None)  # None: every training positive


def parse_positives(text: str) -> list[int | None]:
    """``"1,2,4,all"`` -> ``[1, 2, 4, None]`` (sorted, ``all`` last)."""
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"--positives: {part!r} is neither a count nor 'all'") from None
    return out


def budget_name(n: int | None) -> str:
    return "all" if n is None else str(n)


@dataclass
class EfficiencyConfig:
    """Every choice of a label-efficiency experiment (written next to its results)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    positives: list[int | None] = field(default_factory=lambda: list(DEFAULT_POSITIVES))
    repeats: int = 3
    min_test_positives: int = 20
    modalities: list[str] = field(default_factory=lambda: ["CT", "MR"])
    seed: int = 0
    ct_windows: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.positives:
            raise ValueError("positives: give at least one budget")
        if any(n is not None and n < 1 for n in self.positives):
            raise ValueError("positives: every budget must be at least 1 (or 'all')")
        if len(set(self.positives)) != len(self.positives):
            raise ValueError("positives: a budget is given twice")
        self.positives = sorted(self.positives, key=lambda n: (n is None, n or 0))
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        if self.min_test_positives < 1:
            raise ValueError("min_test_positives must be at least 1")
        self.modalities = [tables.normalize_modality(m) for m in self.modalities]
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities: give CT and/or MR, each once")


def subsample_positives(table: StudyTable, n: int | None, seed: int, repeat: int) -> np.ndarray:
    """Training labels [N_train, C] with, per label, only ``n`` of its positives kept (the first
    ``n`` in an order fixed by seed, repeat and label name) and the rest masked as NaN.
    ``n=None`` returns the training labels unchanged."""
    y = table.y[table.index("train")].copy()
    if n is None:
        return y
    for j, lab in enumerate(table.labels):
        pos = np.flatnonzero(y[:, j] == 1)
        order = np.random.default_rng([seed, repeat, zlib.crc32(lab.encode())]).permutation(pos)
        y[order[n:], j] = np.nan
    return y


def scored_labels(table: StudyTable, min_test_positives: int) -> list[str]:
    """Labels with a training positive, >= ``min_test_positives`` test positives and a test negative."""
    tr, te = table.y[table.index("train")], table.y[table.index("test")]
    pos_tr = np.nansum(tr, 0)
    pos_te = np.nansum(te, 0)
    neg_te = (te == 0).sum(0)
    return [lab for j, lab in enumerate(table.labels)
            if pos_tr[j] >= 1 and pos_te[j] >= min_test_positives and neg_te[j] >= 1]


def restrict(table: StudyTable, labels: list[str]) -> StudyTable:
    cols = [table.labels.index(lab) for lab in labels]
    return replace(table, labels=list(labels), y=table.y[:, cols])


def run_modality(name: str, store: FeatureStore, table: StudyTable, cfg: EfficiencyConfig,
                 progress: bool = False) -> list[dict[str, Any]]:
    """One row per (budget, repeat) for one feature set on one modality's scored labels."""
    tr, va, te = (table.index(s) for s in ("train", "val", "test"))
    for s, idx in (("train", tr), ("val", va), ("test", te)):
        if len(idx) == 0:
            raise EvaluationError(f"{table.modality}: no {s} studies with features")
    bag = lambda i: store.bag(table.study_keys[i], cfg.ct_windows, dtype=np.float32)  # noqa: E731
    b_tr, b_va, b_te = ([bag(i) for i in idx] for idx in (tr, va, te))
    avail = np.nansum(table.y[tr], 0).astype(int)
    y_te = table.y[te]
    done: dict[tuple, dict[str, Any]] = {}  # budgets above every label's count repeat "all"
    rows = []
    jobs = [(r, n) for r in range(cfg.repeats) for n in cfg.positives]
    for repeat, n in tqdm(jobs, desc=f"{name} {table.modality}", disable=not progress):
        y_tr = subsample_positives(table, n, cfg.seed, repeat)
        used = (y_tr == 1).sum(0).astype(int)
        key = (repeat, tuple(used.tolist()))
        if key not in done:
            # repeat r's heads take seeds seed + r * N .. seed + r * N + N - 1 (N = the ensemble's size):
            # no two repeats share a head seed, and with single heads this is seed + r as before
            seed = cfg.train.seed + repeat * cfg.head.ensemble
            head, hist = fit_head(b_tr, y_tr, b_va, table.y[va], replace(cfg.train, seed=seed), head_cfg=cfg.head)
            lt, _ = predict(head, b_te)
            auc = [M.auroc(y_te[:, j], lt[:, j]) for j in range(len(table.labels))]
            val = [h["val_macro_auroc"] for h in hist if np.isfinite(h["val_macro_auroc"])]
            done[key] = {"aurocs": auc, "epochs_run": len(hist), "best_val_macro_auroc": max(val) if val else None}
        res = done[key]
        ok = [a for a in res["aurocs"] if np.isfinite(a)]
        rows.append({"features": name, "modality": table.modality, "positives": budget_name(n), "repeat": repeat,
                     "macro_auroc": float(np.mean(ok)) if ok else None, "labels": len(table.labels),
                     "positives_used_max": int(used.max()), "positives_used_min": int(used.min()),
                     "positives_used_total": int(used.sum()), "positives_available_max": int(avail.max()),
                     "epochs_run": res["epochs_run"], "best_val_macro_auroc": res["best_val_macro_auroc"],
                     "per_label": {lab: {"positives_used": int(u), "positives_available": int(a),
                                         "test_auroc": None if not np.isfinite(x) else float(x)}
                                   for lab, u, a, x in zip(table.labels, used, avail, res["aurocs"])}})
    return rows


def label_efficiency(features: dict[str, str], labels_csv: str, out_dir: str, cfg: EfficiencyConfig | None = None,
                     label_names: dict[str, list[str]] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every feature set on every modality; write ``label_efficiency.json``, ``.csv`` and ``.png``."""
    cfg = cfg or EfficiencyConfig()
    if not features:
        raise EvaluationError("no feature folders given")
    stores = {n: FeatureStore(p) for n, p in features.items()}
    first = next(iter(stores))
    common = set.intersection(*(set(s.studies()) for s in stores.values()))
    summary: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "labels": {}, "rows": [],
                               "features": {n: {"encoder_id": s.meta["encoder_id"], "path": features[n]}
                                            for n, s in stores.items()}}
    for mod in cfg.modalities:
        studies = {k for k in common if stores[first].modality(k) == mod}
        if not studies:
            continue
        table = read_study_table(labels_csv, mod, (label_names or {}).get(mod), studies)
        labs = scored_labels(table, cfg.min_test_positives)
        summary["labels"][mod] = labs
        if not labs:
            continue
        sub = restrict(table, labs)
        for name, store in stores.items():
            summary["rows"] += run_modality(name, store, sub, cfg, progress)
    if not summary["rows"]:
        raise EvaluationError(f"no label has a training positive and >= {cfg.min_test_positives} test positives "
                              f"in {', '.join(cfg.modalities)}; lower --min-test-positives")
    os.makedirs(out_dir, exist_ok=True)
    summary["plot"] = os.path.basename(plot(summary, os.path.join(out_dir, "label_efficiency.png")))
    tmp = os.path.join(out_dir, "label_efficiency.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1, default=_default)
    os.replace(tmp, os.path.join(out_dir, "label_efficiency.json"))
    _write_csv(os.path.join(out_dir, "label_efficiency.csv"),
               [{k: v for k, v in r.items() if k != "per_label"} for r in summary["rows"]])
    return summary


def curves(summary: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{modality: {features: [{positives, x, mean, min, max}]}}: repeats pooled per budget. A
    numeric budget at or above every label's count is the 'all' point and is left out; 'all' sits
    at the largest available count."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in summary["rows"]:
        out.setdefault(r["modality"], {}).setdefault(r["features"], [])
    for mod, per in out.items():
        for name in per:
            rs = [r for r in summary["rows"] if r["modality"] == mod and r["features"] == name]
            top = max(r["positives_available_max"] for r in rs)
            pts = []
            for b in dict.fromkeys(r["positives"] for r in rs):
                if b != "all" and int(b) >= top and any(r["positives"] == "all" for r in rs):
                    continue
                v = [r["macro_auroc"] for r in rs if r["positives"] == b and r["macro_auroc"] is not None]
                if v:
                    pts.append({"positives": b, "x": top if b == "all" else min(int(b), top),
                                "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))})
            per[name] = sorted(pts, key=lambda p: (p["x"], p["positives"] == "all"))
    return out


def plot(summary: dict[str, Any], path: str) -> str:
    """Macro test AUROC against positive training studies per label (log x), one panel per
    modality, one line per feature set (mean over repeats, min-max shaded)."""
    from neurovfm.eval.plots import _finish, _plt

    plt = _plt()
    cs = curves(summary)
    mods = list(cs)
    fig, axes = plt.subplots(1, max(1, len(mods)), figsize=(4.6 * max(1, len(mods)), 3.6), squeeze=False)
    for ax, mod in zip(axes[0], mods):
        ticks: dict[float, str] = {}
        for name, pts in cs[mod].items():
            x = np.array([p["x"] for p in pts], float)
            ax.plot(x, [p["mean"] for p in pts], "o-", ms=3, lw=1.2, label=name)
            ax.fill_between(x, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.2)
            for p in pts:
                ticks[p["x"]] = f"all ({p['x']})" if p["positives"] == "all" else p["positives"]
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([ticks[t] for t in sorted(ticks)], fontsize=7)
        ax.minorticks_off()
        ax.axhline(0.5, color="k", ls=":", lw=0.6)
        ax.set_ylim(0, 1)
        ax.set_xlabel("positive training studies per label")
        ax.set_ylabel("macro test AUROC")
        ax.set_title(f"{mod} ({len(summary['labels'].get(mod, []))} labels)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return _finish(plt, fig, axes, len(mods), path, "Label efficiency (min-max over repeats shaded)")


def summary_table(summary: dict[str, Any]) -> str:
    """Mean macro test AUROC [min, max over repeats] per feature set, modality and budget."""
    cs = curves(summary)
    lines = [f"{'modality':<9}{'features':<14}positives: mean macro test AUROC [min, max over repeats]"]
    for mod, per in cs.items():
        for name, pts in per.items():
            lines.append(f"{mod:<9}{name:<14}" + "  ".join(
                f"{p['positives']}: {p['mean']:.3f} [{p['min']:.3f}, {p['max']:.3f}]" for p in pts))
    return "\n".join(lines)
