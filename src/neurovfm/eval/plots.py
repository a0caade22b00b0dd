"""Pictures and the one-page report of an evaluation: ROC and PR curves, reliability diagrams
before and after calibration, and an HTML page that links everything (static, no scripts)."""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from neurovfm.eval import metrics as M

MAX_PANELS = 12  # headline labels drawn per figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(-s, kind="stable")
    y = y[o]
    tp = np.concatenate([[0], np.cumsum(y)]) / max(y.sum(), 1)
    fp = np.concatenate([[0], np.cumsum(1 - y)]) / max((1 - y).sum(), 1)
    return fp, tp


def _pr(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(-s, kind="stable")
    y = y[o]
    tp = np.cumsum(y)
    prec = tp / np.arange(1, len(y) + 1)
    rec = tp / max(y.sum(), 1)
    return rec, prec


def _grid(n: int):
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    return rows, cols


def write_modality_plots(out_dir: str, modality: str, runs: dict[str, Any], headline: list[str], cfg) -> list[str]:
    """ROC, PR and reliability figures for the headline labels of one modality."""
    if not headline:
        return []
    plt = _plt()
    labels = headline[:MAX_PANELS]
    written = []
    for kind in ("roc", "pr"):
        rows, cols = _grid(len(labels))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax, lab in zip(axes.flat, labels):
            for name, run in runs.items():
                j = run.table.labels.index(lab)
                y = run.table.y[run.test_idx][:, j]
                m = ~np.isnan(y)
                x1, x2 = (_roc if kind == "roc" else _pr)(y[m], run.scores_test[m, j])
                score = M.auroc(y[m], run.scores_test[m, j]) if kind == "roc" else M.auprc(y[m], run.scores_test[m, j])
                ax.plot(x1, x2, lw=1.2, label=f"{name} {score:.2f}")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], "k:", lw=0.6)
                ax.set_xlabel("1 - specificity")
                ax.set_ylabel("sensitivity")
            else:
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
            ax.set_title(lab.replace("_", " "), fontsize=8)
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "upper right")
        written.append(_finish(plt, fig, axes, len(labels), os.path.join(out_dir, f"{kind}_{modality.lower()}.png"),
                               f"{modality} test set: {'ROC' if kind == 'roc' else 'precision-recall'} "
                               "(headline labels)"))
    first = next(iter(runs.values()))
    rows, cols = _grid(len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        j = first.table.labels.index(lab)
        y = first.table.y[first.test_idx][:, j]
        m = ~np.isnan(y)
        band = M.reliability_curve(y[m], first.probs_test[m, j], bins=10)
        if len(band["counts"]):  # where a perfectly calibrated model's observed rate falls (95 %)
            rng = np.random.default_rng(0)
            sims = rng.binomial(band["counts"][None, :], np.clip(band["mean_predicted"], 0, 1)[None, :],
                                size=(2000, len(band["counts"]))) / band["counts"][None, :]
            lo, hi = np.quantile(sims, [0.025, 0.975], axis=0)
            ax.fill_between(band["mean_predicted"], lo, hi, color="0.85", lw=0, label="calibrated, 95 %")
        for probs, name in ((first.probs_test_raw, "before"), (first.probs_test, "after")):
            curve = M.reliability_curve(y[m], probs[m, j], bins=10)
            ece = M.ece(y[m], probs[m, j])
            ax.plot(curve["mean_predicted"], curve["observed"], "o-", ms=3, lw=1, label=f"{name} ECE {ece:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.6)
        ax.set_title(lab.replace("_", " "), fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
        ax.legend(fontsize=6)
    written.append(_finish(plt, fig, axes, len(labels), os.path.join(out_dir, f"reliability_{modality.lower()}.png"),
                           f"{modality}: reliability on test, {first.name}, calibration fitted on validation"))
    return written


def _finish(plt, fig, axes, used: int, path: str, title: str | None) -> str:
    """Blank the unused panels, title, lay out, save and close: every evaluation figure ends here."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def _ci(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def write_html(out_dir: str, summary: dict[str, Any]) -> str:
    """One static page: macro AUROC with intervals, comparisons, calibration, triage, per label."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>neurovfm evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
             "img{max-width:100%}</style></head><body><h1>neurovfm evaluation (test split)</h1>",
             "<p>Heads fitted on train; epoch, calibration and thresholds chosen on validation; every number "
             "below is on test. Intervals: 95 % bootstrap over patients.</p>"]
    models = summary["models"]
    mods = sorted({m for v in models.values() for m in v})
    parts.append("<h2>Macro AUROC over headline labels</h2><table><tr><th>model</th>"
                 + "".join(f"<th>{m}</th>" for m in mods) + "</tr>")
    for name, per in models.items():
        parts.append(f"<tr><td>{html.escape(name)}</td>"
                     + "".join(f"<td>{_ci(per.get(m, {}).get('macro_auroc'))}</td>" for m in mods) + "</tr>")
    parts.append("</table>")
    if summary.get("comparisons"):
        parts.append("<h2>Paired differences</h2><table><tr><th>difference</th>"
                     + "".join(f"<th>{m}</th>" for m in mods) + "</tr>")
        for name, per in summary["comparisons"].items():
            parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(
                f"<td>{_ci(per.get(m))} p={_fmt(per.get(m, {}).get('p_value'))}</td>" for m in mods) + "</tr>")
        parts.append("</table>")
    for m in mods:
        parts.append(f"<h2>{m}</h2>")
        for name, per in models.items():
            e = per.get(m)
            if not e:
                continue
            tri = e.get("triage") or {}
            parts.append(f"<h3>{html.escape(name)}</h3><p>headline labels (&ge; threshold test positives): "
                         f"{', '.join(e['headline_labels']) or 'none'}; test studies {e['test_studies']}; "
                         f"ECE headline mean before {_fmt(e.get('headline_ece_before'))}, after "
                         f"{_fmt(e.get('headline_ece_after'))}; attention on air/bone tokens "
                         f"{_fmt(e.get('attention_on_nonbrain_tokens'))}</p>")
            hm = e.get("head_members")
            if hm:
                parts.append(f"<p>Head: {html.escape(str(e.get('head')))}; headline macro AUROC of each seed's head "
                             f"{', '.join(_fmt(v) for v in hm['member_macro_auroc'])} (sd {_fmt(hm.get('member_sd'))}); "
                             f"their mean logit {_fmt(hm.get('ensemble_macro_auroc'))}</p>")
            cr = e.get("calibration_resolution")
            if cr:
                parts.append(f"<p>Calibration resolution: a perfectly calibrated model with these predictions "
                             f"would score ECE {_fmt(cr.get('ece_floor_mean'))} at this test size (the plug-in "
                             f"estimator's bias); debiased RMS calibration error "
                             f"{_fmt(cr.get('rmsce_debiased_mean'))}; labels miscalibrated beyond sampling noise "
                             f"(p &lt; 0.05): {html.escape(', '.join(cr.get('miscalibrated_labels') or []) or 'none')}; "
                             f"pooled over {cr.get('pooled_n')} headline probabilities ECE "
                             f"{_fmt(cr.get('pooled_ece'))} (floor {_fmt(cr.get('pooled_ece_floor'))}, "
                             f"p {_fmt(cr.get('pooled_ece_p'))}); test studies needed for a 0.05 floor per "
                             f"label: about {cr.get('test_studies_for_floor_0_05_median')}</p>")
            if tri:
                mt = tri.get("at_matched_flag_rate") or {}
                parts.append(f"<p>Triage: urgent AUROC {_fmt(tri.get('urgent_auroc'))}; at the flag rate of "
                             f"{html.escape(str(tri.get('comparator')))} ({_fmt(tri.get('comparator_flag_rate'))}) "
                             f"urgent sensitivity {_fmt(mt.get('sensitivity'))}, specificity "
                             f"{_fmt(mt.get('specificity'))}; level agreement {_fmt(tri.get('level_agreement'))}</p>")
            parts.append("<table><tr><th>label</th><th>test +</th><th>AUROC</th><th>AUPRC</th><th>ECE before</th>"
                         "<th>ECE after</th><th>Brier after</th><th>sens @thr</th><th>spec @thr</th>"
                         "<th>flag rate</th></tr>")
            for r in e["labels"]:
                if r.get("auroc") is None:
                    continue
                b = "<b>" if r["label"] in e["headline_labels"] else ""
                parts.append(f"<tr><td>{b}{html.escape(r['label'])}</td><td>{r['test_positives']}</td>"
                             f"<td>{_fmt(r.get('auroc'))}</td><td>{_fmt(r.get('auprc'))}</td>"
                             f"<td>{_fmt(r.get('ece_before'))}</td><td>{_fmt(r.get('ece_after'))}</td>"
                             f"<td>{_fmt(r.get('brier_after'))}</td><td>{_fmt(r.get('op_sensitivity'))}</td>"
                             f"<td>{_fmt(r.get('op_specificity'))}</td><td>{_fmt(r.get('op_flag_rate'))}</td></tr>")
            parts.append("</table>")
            for key, rows in (e.get("breakdowns") or {}).items():
                parts.append(f"<p>by {key}: " + "; ".join(
                    f"{html.escape(r['group'])} ({r['studies']}): {_fmt(r['macro_auroc'])}" for r in rows) + "</p>")
        for fig in ("roc", "pr", "reliability"):
            f = f"{fig}_{m.lower()}.png"
            if os.path.exists(os.path.join(out_dir, f)):
                parts.append(f"<img src='{f}' alt='{fig} {m}'>")
        for f in sorted(os.listdir(out_dir)):
            if f.startswith(f"gallery_{m.lower()}") and f.endswith(".png"):
                parts.append(f"<img src='{f}' alt='{f}'>")
    parts.append("</body></html>")
    path = os.path.join(out_dir, "index.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(parts))
    os.replace(tmp, path)
    return path


# -- galleries of the most confident mistakes -----------------------------------------------------
def study_slice(cache, study_key: str, view: str | None = None) -> np.ndarray | None:
    """The middle slice of a study's largest series, rebuilt from its cached foreground tokens
    (background tokens stay black): enough to see what the model was looking at."""
    import json as _json

    from neurovfm.tokens.patches import unpatchify

    entries = cache.series(study_key=study_key)
    if not entries:
        return None
    e = max(entries, key=lambda r: int(r.n_tokens))
    u8, coords, names = cache.views(e, [view] if (view and e.modality == "CT") else None)
    grid = tuple(_json.loads(e.row["grid_shape"]))
    patch = cache.policy.patch
    full = np.zeros((int(np.prod(grid)), u8.shape[2]), np.uint8)
    flat = np.ravel_multi_index(tuple(np.asarray(coords, np.int64).T), grid)
    full[flat] = u8[:, 0]
    vol = unpatchify(full, grid, patch)
    d = int(np.argmax((vol > 0).sum((1, 2))))  # the slice with the most foreground
    return vol[d]


def write_galleries(out_dir: str, modality: str, run: Any, labels: list[str], cache, n: int = 4
                    ) -> dict[str, list[dict[str, Any]]]:
    """Two PNGs per modality: the ``n`` most confident false positives (negatives with the
    highest calibrated probability, over the headline labels) and false negatives (positives
    with the lowest), each with the study's middle slice, so a reader can see what fooled it.
    Returns what each gallery shows (study key, label, calibrated probability)."""
    if not labels or n <= 0:
        return {}
    plt = _plt()
    t = run.table
    cols = [t.labels.index(lab) for lab in labels]
    y = t.y[run.test_idx][:, cols]
    p = run.probs_test[:, cols]
    shown: dict[str, list[dict[str, Any]]] = {}
    for kind, truth, order in (("false_positives", 0, -1), ("false_negatives", 1, 1)):
        cand = [(order * p[i, j], i, j) for i in range(len(p)) for j in range(len(cols)) if y[i, j] == truth]
        cand.sort()
        picks, seen = [], set()
        for _, i, j in cand:
            if i in seen:
                continue  # one entry per study
            seen.add(i)
            picks.append((i, j))
            if len(picks) == n:
                break
        if not picks:
            continue
        fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 2.9), squeeze=False)
        for ax, (i, j) in zip(axes[0], picks):
            img = study_slice(cache, t.study_keys[run.test_idx[i]], "brain")
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{labels[j].replace('_', ' ')}\np={p[i, j]:.2f} (truth {'yes' if truth else 'no'})", fontsize=7)
        path = os.path.join(out_dir, f"gallery_{modality.lower()}_{kind}.png")
        _finish(plt, fig, axes, len(picks), path, f"{modality} test: most confident {kind.replace('_', ' ')} ({run.name})")
        shown[kind] = [{"study_key": t.study_keys[run.test_idx[i]], "label": labels[j], "p": float(p[i, j]),
                        "file": os.path.basename(path)} for i, j in picks]
    return shown
