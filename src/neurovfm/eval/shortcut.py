"""`neurovfm shortcut`: does a feature set tell CT from MRI by the background, and does the head
look at the background?

The reference system's known failure is a modality shortcut (CT and MRI told apart by the
statistics of air and skull rather than of the brain) and head attention piled on air / bone
tokens. Two checks, both on the test split:

* **Separability.** Per feature set, an L2-regularised logistic-regression probe predicts CT vs
  MR from the study mean of (i) soft-tissue tokens only (``KIND_SOFT``: background-free),
  (ii) air / bone tokens only, (iii) all tokens. Trained on train studies (the L2 strength chosen
  on validation), scored on test studies: AUROC with a 95 % patient-bootstrap interval. CT and
  MRI brains differ, so (i) is expected to separate; what matters is that it does *without*
  the background tokens, i.e. that a probe does not need (ii) to do it.
* **Attention.** From an ``evaluate`` ``metrics.json``, each model's share of head attention on
  non-brain (air / bone) tokens per modality, next to the share of such tokens in the test
  studies (what uniform attention would give): a ratio well above one means the head looks at
  the background more than its size warrants.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from neurovfm.errors import NeuroVFMError
from neurovfm.eval import metrics as M
from neurovfm.eval.calibrate import fit_logistic, sigmoid
from neurovfm.eval.data import StudyTable, read_study_table
from neurovfm.eval.standardize import fit_standardization, standardize
from neurovfm.pretrain.data import KIND_AIR, KIND_BONE, KIND_SOFT

SUBSETS = ("soft", "nonbrain", "all")
SUBSET_TITLES = {"soft": "(i) soft tissue only", "nonbrain": "(ii) air/bone only", "all": "(iii) all tokens"}
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_L2 = 1.0
NEWTON_STEPS = 100


class ShortcutError(NeuroVFMError):
    """The shortcut check cannot run: a modality or a split is missing, or inputs do not join."""


class TokenStore(Protocol):
    """What the check reads (a :class:`neurovfm.probe.embed.FeatureStore` or anything alike)."""

    def studies(self) -> list[str]: ...

    def modality(self, study_key: str) -> str: ...

    def bag(self, study_key: str, views: list[str] | None = None, dtype=np.float32) -> np.ndarray: ...

    def bag_kinds(self, study_key: str, views: list[str] | None = None) -> np.ndarray: ...


@dataclass
class ShortcutConfig:
    bootstrap: int = 1000
    seed: int = 0
    l2: float | None = None  # None: chosen on validation from L2_GRID (DEFAULT_L2 if it cannot be)
    ct_windows: list[str] | None = None  # None: every view the features hold (as `evaluate`)
    l2_grid: list[float] = field(default_factory=lambda: list(L2_GRID))

    def __post_init__(self) -> None:
        if self.bootstrap < 100:
            raise ValueError("bootstrap needs at least 100 resamples")
        if self.l2 is not None and self.l2 < 0:
            raise ValueError("l2 must be >= 0")


# -- the probe -------------------------------------------------------------------------------------
@dataclass
class LogisticProbe:
    """Binary logistic regression on standardised features, L2 on the weights (not the bias),
    fitted by damped Newton steps: deterministic, no randomness, no extra dependency."""

    l2: float = DEFAULT_L2
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    w: np.ndarray | None = None  # [d + 1], last entry the bias

    def _design(self, x: np.ndarray) -> np.ndarray:
        z = standardize(np.asarray(x, np.float64), self.mean, self.scale)
        return np.hstack([z, np.ones((len(z), 1))])

    def fit(self, x, y) -> "LogisticProbe":
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if len(x) != len(y) or not len(y):
            raise ShortcutError("probe: features and targets differ in length, or are empty")
        if not 0 < y.sum() < len(y):
            raise ShortcutError("probe: the training studies hold only one modality")
        self.mean, self.scale = fit_standardization(x)
        X = self._design(x)
        reg = np.full(X.shape[1], self.l2)
        reg[-1] = 0.0  # the bias is not shrunk
        self.w = fit_logistic(X, y, reg, steps=NEWTON_STEPS)
        return self

    def decision(self, x) -> np.ndarray:
        return self._design(x) @ self.w

    def predict_proba(self, x) -> np.ndarray:
        return sigmoid(self.decision(x))


# -- study means by token kind ---------------------------------------------------------------------
def study_means(store: TokenStore, keys: list[str], windows: list[str] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per study, the mean feature of its soft-tissue tokens, of its air/bone tokens and of all
    its tokens ([N, dim] each; NaN rows where a study has no token of that kind), and the
    fractions of air, bone and non-brain tokens ([N] each)."""
    means: dict[str, list[np.ndarray]] = {s: [] for s in SUBSETS}
    share: dict[str, list[float]] = {"air": [], "bone": [], "nonbrain": [], "tokens": []}
    for k in keys:
        x = np.asarray(store.bag(k, windows, dtype=np.float32), np.float64)
        kinds = np.asarray(store.bag_kinds(k, windows))
        if len(kinds) != len(x):
            raise ShortcutError(f"study {k[:12]}…: {len(x)} token features but {len(kinds)} token kinds")
        soft = kinds == KIND_SOFT
        for name, m in (("soft", soft), ("nonbrain", ~soft), ("all", np.ones(len(x), bool))):
            means[name].append(x[m].mean(0) if m.any() else np.full(x.shape[1], np.nan))
        n = max(len(kinds), 1)
        share["air"].append(float((kinds == KIND_AIR).sum() / n))
        share["bone"].append(float((kinds == KIND_BONE).sum() / n))
        share["nonbrain"].append(float((~soft).sum() / n))
        share["tokens"].append(float(len(kinds)))
    return ({s: np.stack(v) if v else np.zeros((0, 0)) for s, v in means.items()},
            {s: np.asarray(v, np.float64) for s, v in share.items()})


def modality_table(labels_csv: str, studies: set[str]) -> StudyTable:
    """CT and MR studies of ``studies`` in one table: y = 1 for MR, 0 for CT."""
    parts = []
    for mod in ("CT", "MR"):
        try:
            parts.append(read_study_table(labels_csv, mod, [], studies))
        except NeuroVFMError as e:
            if "no " + mod in str(e):
                raise ShortcutError(f"{labels_csv}: no {mod} studies with features; the check needs both "
                                    "modalities") from None
            raise
    ct, mr = parts
    return StudyTable("CT+MR", [], ct.study_keys + mr.study_keys, np.concatenate([ct.patients, mr.patients]),
                      np.concatenate([ct.splits, mr.splits]),
                      np.concatenate([np.zeros(len(ct.study_keys)), np.ones(len(mr.study_keys))]).reshape(-1, 1))


def _choose_l2(x_tr, y_tr, x_va, y_va, cfg: ShortcutConfig) -> tuple[float, str]:
    if cfg.l2 is not None:
        return cfg.l2, "given"
    if len(y_va) < 2 or not 0 < y_va.sum() < len(y_va):
        return DEFAULT_L2, "default (validation lacks a modality)"
    best, best_l2 = -np.inf, DEFAULT_L2
    for l2 in sorted(cfg.l2_grid, reverse=True):  # ties: the stronger penalty
        a = M.auroc(y_va, LogisticProbe(l2).fit(x_tr, y_tr).decision(x_va))
        if np.isfinite(a) and a > best + 1e-12:
            best, best_l2 = a, l2
    return best_l2, "validation AUROC"


def probe_subset(x: np.ndarray, table: StudyTable, cfg: ShortcutConfig) -> dict[str, Any]:
    """Fit on train (L2 on validation), score on test: AUROC with a patient-bootstrap interval."""
    y = table.y[:, 0]
    ok = np.isfinite(x).all(1)
    idx = {s: table.index(s)[ok[table.index(s)]] for s in ("train", "val", "test")}
    res: dict[str, Any] = {f"n_{s}": int(len(i)) for s, i in idx.items()}
    res["dropped_without_tokens"] = int((~ok).sum())
    res["dropped_by_modality"] = {"CT": int((~ok & (y == 0)).sum()), "MR": int((~ok & (y == 1)).sum())}
    tr, va, te = idx["train"], idx["val"], idx["test"]
    gone = [m for m, v in (("CT", 0), ("MR", 1)) if (y == v).any() and not (ok & (y == v)).any()]
    if gone:  # e.g. MRI series whose cached (foreground) tokens are all soft tissue
        res.update(auroc=None, note=f"no {' or '.join(gone)} study has tokens of this kind (their share alone "
                                    "tells the modality)")
        return res
    if not 0 < y[tr].sum() < len(tr):
        res.update(auroc=None, note="train split lacks a modality (or its tokens of this kind)")
        return res
    l2, how = _choose_l2(x[tr], y[tr], x[va], y[va], cfg)
    probe = LogisticProbe(l2).fit(x[tr], y[tr])
    res.update(l2=l2, l2_chosen_by=how)
    if not 0 < y[te].sum() < len(te):
        res.update(auroc=None, note="test split lacks a modality (or its tokens of this kind)")
        return res
    s = probe.decision(x[te])
    ci = M.bootstrap_ci(y[te], s, table.patients[te], M.auroc, n=cfg.bootstrap, seed=cfg.seed)
    res.update(auroc=ci["estimate"], low=ci["low"], high=ci["high"], test_scores=s.tolist(),
               test_study_keys=[table.study_keys[i] for i in te])
    return res


# -- the whole check -------------------------------------------------------------------------------
def _read_eval_metrics(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ShortcutError(f"{path}: evaluate metrics.json not found")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ShortcutError(f"{path}: not a JSON file ({e})") from None


def attention_rows(eval_summary: dict[str, Any], share_by_mod: dict[str, float | None]) -> list[dict[str, Any]]:
    """Per model and modality of an evaluate summary: head attention share on air/bone tokens,
    the share of such tokens, and their ratio (1: no more attention than uniform)."""
    rows = []
    for model, per in (eval_summary.get("models") or {}).items():
        for mod, e in per.items():
            att = e.get("attention_on_nonbrain_tokens")
            if att is None:
                continue
            sh = share_by_mod.get(mod)
            rows.append({"model": model, "modality": mod, "attention_on_nonbrain_tokens": float(att),
                         "nonbrain_token_share": sh, "ratio": float(att) / sh if sh else None,
                         "head": e.get("head")})
    return rows


def shortcut_check(stores: dict[str, TokenStore], labels_csv: str, out_dir: str | None = None,
                   cfg: ShortcutConfig | None = None, eval_metrics: str | None = None,
                   paths: dict[str, str] | None = None) -> dict[str, Any]:
    """Run both checks; write ``shortcut.json``, ``shortcut.csv`` and ``shortcut.png`` to ``out_dir``."""
    cfg = cfg or ShortcutConfig()
    if not stores:
        raise ShortcutError("no feature sets given")
    windows = cfg.ct_windows
    eval_summary = _read_eval_metrics(eval_metrics) if eval_metrics else None
    if eval_summary is not None and windows is None:  # count the tokens the heads saw
        windows = (eval_summary.get("config") or {}).get("ct_windows")
    common = set.intersection(*(set(s.studies()) for s in stores.values()))
    table = modality_table(labels_csv, common)
    summary: dict[str, Any] = {"config": asdict(cfg), "target": "MR (1) vs CT (0)",
                               "subsets": SUBSET_TITLES, "probes": {}, "token_share": {},
                               "studies": {s: {"CT": int(((table.splits == s) & (table.y[:, 0] == 0)).sum()),
                                               "MR": int(((table.splits == s) & (table.y[:, 0] == 1)).sum())}
                                           for s in ("train", "val", "test")},
                               "features": {n: {"path": (paths or {}).get(n),
                                                "encoder_id": getattr(s, "meta", {}).get("encoder_id")}
                                            for n, s in stores.items()}}
    te = table.index("test")
    for name, store in stores.items():
        means, share = study_means(store, table.study_keys, windows)
        summary["probes"][name] = {s: probe_subset(means[s], table, cfg) for s in SUBSETS}
        ts = {}
        for mod, val in (("CT", 0), ("MR", 1)):
            i = te[table.y[te, 0] == val]
            ts[mod] = {"studies": int(len(i)), **{k: (float(share[k][i].mean()) if len(i) else None)
                                                  for k in ("air", "bone", "nonbrain")}}
        summary["token_share"][name] = ts
    if eval_summary is not None:
        first = next(iter(summary["token_share"].values()))
        summary["attention"] = attention_rows(eval_summary, {m: v["nonbrain"] for m, v in first.items()})
        summary["eval_metrics"] = eval_metrics
        summary["ct_windows_used"] = windows
    if out_dir:
        write_outputs(out_dir, summary)
    return summary


def csv_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, per in summary["probes"].items():
        for sub, r in per.items():
            rows.append({"section": "probe", "features": name, "subset": sub, "auroc": r.get("auroc"),
                         "low": r.get("low"), "high": r.get("high"), "n_train": r["n_train"], "n_val": r["n_val"],
                         "n_test": r["n_test"], "l2": r.get("l2")})
    for name, per in summary["token_share"].items():
        for mod, r in per.items():
            rows.append({"section": "token_share", "features": name, "modality": mod, "n_test": r["studies"],
                         "air_share": r["air"], "bone_share": r["bone"], "nonbrain_token_share": r["nonbrain"]})
    for r in summary.get("attention", []):
        rows.append({"section": "attention", "features": r["model"], "modality": r["modality"],
                     "attention_on_nonbrain_tokens": r["attention_on_nonbrain_tokens"],
                     "nonbrain_token_share": r["nonbrain_token_share"], "ratio": r["ratio"]})
    return rows


def write_outputs(out_dir: str, summary: dict[str, Any]) -> list[str]:
    from neurovfm.eval.experiment import _default, _write_csv

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "shortcut.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=1, default=_default)
    os.replace(path + ".tmp", path)
    _write_csv(os.path.join(out_dir, "shortcut.csv"), csv_rows(summary))
    png = plot(out_dir, summary)
    return [path, os.path.join(out_dir, "shortcut.csv"), png]


def plot(out_dir: str, summary: dict[str, Any]) -> str:
    from neurovfm.eval.plots import _plt

    plt = _plt()
    att = summary.get("attention") or []
    fig, axes = plt.subplots(1, 2 if att else 1, figsize=(11 if att else 6, 3.8), squeeze=False)
    ax = axes[0, 0]
    names = list(summary["probes"])
    width = 0.8 / len(SUBSETS)
    for j, sub in enumerate(SUBSETS):
        xs, hs, err = [], [], []
        for i, n in enumerate(names):
            r = summary["probes"][n][sub]
            a = r.get("auroc")
            xs.append(i + (j - 1) * width)
            hs.append(a if a is not None else 0.0)
            lo, hi = r.get("low"), r.get("high")
            ok = a is not None and lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
            err.append((a - lo, hi - a) if ok else (0.0, 0.0))
        ax.bar(xs, hs, width, yerr=np.array(err).T, capsize=3, label=SUBSET_TITLES[sub])
        for x, n in zip(xs, names):
            if summary["probes"][n][sub].get("auroc") is None:
                ax.text(x, 0.03, "n/a", ha="center", fontsize=7)
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test AUROC, MR vs CT")
    ax.set_title("modality separability by token kind")
    ax.legend(fontsize=7, loc="lower right")
    if att:
        ax = axes[0, 1]
        lab = [f"{r['model']}\n{r['modality']}" for r in att]
        x = np.arange(len(att))
        ax.bar(x - 0.2, [r["attention_on_nonbrain_tokens"] for r in att], 0.4, label="head attention share")
        ax.bar(x + 0.2, [r["nonbrain_token_share"] or 0.0 for r in att], 0.4, label="token share")
        ax.set_xticks(x)
        ax.set_xticklabels(lab, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title("air/bone tokens: attention vs share (test)")
        ax.legend(fontsize=7)
    from neurovfm.eval.plots import _finish

    return _finish(plt, fig, axes, axes.size, os.path.join(out_dir, "shortcut.png"), None)


def format_table(summary: dict[str, Any]) -> str:
    def f(x):
        return "   –  " if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"

    lines = ["CT vs MR probe, test AUROC [95% patient CI]  (train/val/test studies per probe)"]
    lines.append(f"{'features':14s} " + " ".join(f"{SUBSET_TITLES[s]:>34s}" for s in SUBSETS))
    for name, per in summary["probes"].items():
        cells = []
        for s in SUBSETS:
            r = per[s]
            cells.append(f"{f(r.get('auroc'))} [{f(r.get('low'))}, {f(r.get('high'))}] "
                         f"({r['n_train']}/{r['n_val']}/{r['n_test']})")
        lines.append(f"{name:14s} " + " ".join(f"{c:>34s}" for c in cells))
        for sub in SUBSETS:
            if per[sub].get("note"):
                lines.append(f"{'':14s} {SUBSET_TITLES[sub]}: {per[sub]['note']}")
    first = next(iter(summary["token_share"].values()), {})
    lines.append("air/bone token share of test studies: "
                 + ", ".join(f"{m} {f(v['nonbrain'])} (air {f(v['air'])}, bone {f(v['bone'])})"
                             for m, v in first.items()))
    for r in summary.get("attention", []):
        lines.append(f"head attention on air/bone: {r['model']} {r['modality']}: {f(r['attention_on_nonbrain_tokens'])}"
                     f" vs token share {f(r['nonbrain_token_share'])} (ratio {f(r['ratio'])})")
    return "\n".join(lines)
