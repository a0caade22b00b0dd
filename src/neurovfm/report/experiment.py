"""The report experiment on the embedded archive: (a) image-conditioned reports, (b) the same LLM
given only the indication, (c) a template report from the calibrated head, (d) (a) after the
consistency guard; finding-level F1 with paired patient bootstrap intervals, hallucination,
laterality errors, urgent misses, triage, and what the guard recovers and adds.

Every step writes its own resumable output (one JSON line or folder per study), so a CPU run
stopped anywhere continues where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import numpy as np

from ..errors import NeuroVFMError
from ..tokens.cache import atomic_write_text
from .data import build_examples, read_truth, series_features
from .evaluation import paired_f1_bootstrap, bootstrap_metric_ci, report_metrics, study_counts
from .guard import apply_guard, choose_guard_threshold, guard_effect, template_report
from .schema import exam_type_for

SYSTEMS = ("a_image", "b_indication_only", "c_head_template", "d_image_guarded")
COMPARISONS = (("a_image", "b_indication_only"), ("d_image_guarded", "a_image"),
               ("a_image", "c_head_template"), ("d_image_guarded", "c_head_template"))


class ReportExperimentError(NeuroVFMError):
    """Inputs of the report experiment are missing or do not line up."""


def _done_keys(path: str) -> dict[str, dict[str, Any]]:
    out = {}
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                    out[r["study_key"]] = r
                except (json.JSONDecodeError, KeyError):
                    continue          # a line cut by a crash: that study is redone
    return out


def study_folders(archive: str, keyed_findings: str) -> dict[str, str]:
    """study_key -> the study's DICOM folder. The archive's findings.jsonl and its keyed copy hold
    the same studies in the same order (rekey rewrites line by line); checked field by field."""
    raw = read_truth_raw(os.path.join(archive, "findings.jsonl"))
    keyed = read_truth(keyed_findings)
    if len(raw) != len(keyed):
        raise ReportExperimentError(f"{archive}: {len(raw)} studies but {keyed_findings} has {len(keyed)}")
    out = {}
    for n, (r, k) in enumerate(zip(raw, keyed)):
        if (r["split"], r["modality"], r.get("indication"), len(r["findings"])) != \
                (k["split"], k["modality"], k.get("indication"), len(k["findings"])):
            raise ReportExperimentError(f"line {n + 1}: archive and keyed findings describe different studies")
        out[k["study_key"]] = os.path.join(archive, os.path.dirname(r["series"][0]["path"]))
    return out


def read_truth_raw(path: str) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_heads(archive: str, keyed_findings: str, model: str | None, out: str, splits=("val", "test"),
              progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """The calibrated head (and its map sides) on every study of the splits, through the same
    `neurovfm analyze` code a user runs (no maps written). Resumable: studies with a result.json
    are skipped."""
    from ..analyze.config import AnalyzeConfig
    from ..analyze.pipeline import Analyzer

    folders = study_folders(archive, keyed_findings)
    keyed = {r["study_key"]: r for r in read_truth(keyed_findings)}
    todo = [k for k in sorted(folders) if keyed[k]["split"] in splits]
    an = Analyzer(model, AnalyzeConfig(maps="none"))
    for i, k in enumerate(todo):
        d = os.path.join(out, k)
        if not os.path.isfile(os.path.join(d, "result.json")):
            an.run(folders[k], d)
        if progress:
            progress(i + 1, len(todo))
    return {k: os.path.join(out, k, "result.json") for k in todo}


def head_rows(result_path: str, modality: str) -> list[dict[str, Any]]:
    with open(result_path) as fh:
        res = json.load(fh)
    for ex in res.get("exams", []):
        if ex["modality"] == modality:
            return ex["labels"]
    return []


def generate_split(report_model: str, features: str, keyed_findings: str, out_jsonl: str, splits=("val", "test"),
                   num_beams: int = 1, llm: str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Reports of a report model for every study of the splits, appended to out_jsonl one line per
    study (resumable). Failures are recorded as typed errors, never skipped silently."""
    from .constrained import ReportGrammar
    from .folder import load_report_model
    from .schema import ReportGenerationError

    vlm, schema, cfg = load_report_model(report_model, llm)
    grammar = ReportGrammar(schema, vlm.tokenizer)
    done = _done_keys(out_jsonl)
    exs = [e for e in build_examples(keyed_findings, features, tuple(splits))
           if e.study_key not in done and (keys is None or e.study_key in keys)]
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
    with open(out_jsonl, "a") as fh:
        for i, ex in enumerate(exs):
            t = time.perf_counter()
            feats = series_features(ex, int(cfg.get("max_tokens_per_series") or 512)) if cfg.get("use_images", True) else []
            ind = ex.indication if cfg.get("use_indication", True) else None
            row: dict[str, Any] = {"study_key": ex.study_key}
            try:
                row["report"] = vlm.generate_report(feats, grammar, ind, num_beams=num_beams)
            except ReportGenerationError as e:
                row["error"] = str(e)
            row["seconds"] = round(time.perf_counter() - t, 2)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done[ex.study_key] = row
            if progress:
                progress(i + 1, len(exs))
    return done


def _empty_report(modality: str) -> dict[str, Any]:
    return {"exam_type": exam_type_for(modality), "findings": [], "impression": ""}


def evaluate_reports(keyed_findings: str, image_reports: str, text_reports: str, heads_dir: str,
                     out: str, max_false_per_study: float = 0.1, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """(a)-(d) on the test split; the guard threshold is chosen on the validation split."""
    truths = {r["study_key"]: r for r in read_truth(keyed_findings)}
    train_vocab = sorted({f["label"] for r in truths.values() if r["split"] == "train" for f in r["findings"]})
    A, B = _done_keys(image_reports), _done_keys(text_reports)

    def rows_for(split):
        keys = sorted(k for k, r in truths.items() if r["split"] == split)
        missing = [k for k in keys if k not in A or k not in B or
                   not os.path.isfile(os.path.join(heads_dir, k, "result.json"))]
        if missing:
            raise ReportExperimentError(f"{len(missing)} {split} studies lack a report or head result "
                                        f"(e.g. {missing[0][:12]}…); run the generation/heads steps first")
        return keys

    def rep(store, k):
        r = store[k]
        return r.get("report") or _empty_report(truths[k]["modality"])   # a failed generation reports nothing

    val, test = rows_for("val"), rows_for("test")
    heads = {k: head_rows(os.path.join(heads_dir, k, "result.json"), truths[k]["modality"]) for k in val + test}
    choice = choose_guard_threshold([rep(A, k) for k in val], [heads[k] for k in val], [truths[k] for k in val],
                                    train_vocab, max_false_per_study=max_false_per_study)
    thr = choice["threshold"]
    systems: dict[str, dict[str, Any]] = {s: {} for s in SYSTEMS}
    flags = {}
    for k in test:
        t = truths[k]
        systems["a_image"][k] = rep(A, k)
        systems["b_indication_only"][k] = rep(B, k)
        systems["c_head_template"][k] = template_report(heads[k], t["modality"], train_vocab,
                                                        exam_type_for(t["modality"]))
        g, fl = apply_guard(rep(A, k), heads[k], train_vocab, thr)
        systems["d_image_guarded"][k] = g
        flags[k] = fl
    groups = [truths[k].get("patient_key", k) for k in test]
    counts = {s: [study_counts(systems[s][k], truths[k]) for k in test] for s in SYSTEMS}
    metrics = {}
    for s in SYSTEMS:
        m = report_metrics(counts[s])
        m["f1_ci"] = bootstrap_metric_ci(counts[s], groups, "f1", n=n_boot, seed=seed)
        metrics[s] = m
    comps = {f"{a} - {b}": paired_f1_bootstrap(counts[a], counts[b], groups, n=n_boot, seed=seed)
             for a, b in COMPARISONS}
    effect = guard_effect([systems["a_image"][k] for k in test], [systems["d_image_guarded"][k] for k in test],
                          [truths[k] for k in test])
    failures = {"a_image": sum("error" in A[k] for k in test), "b_indication_only": sum("error" in B[k] for k in test)}
    secs = {"a_image": float(np.mean([A[k].get("seconds", np.nan) for k in test])),
            "b_indication_only": float(np.mean([B[k].get("seconds", np.nan) for k in test]))}
    goals = {
        "a_beats_b_f1_interval_above_zero": bool(comps["a_image - b_indication_only"]["low"] > 0),
        "guard_recovers_80pct_urgent_misses": bool((effect.get("urgent_recovered_fraction") or 0) >= 0.8),
        "guard_adds_at_most_0.1_false_per_study": bool(effect.get("false_added_per_study", 1) <= 0.1),
    }
    res = {"n_test": len(test), "n_val": len(val), "vocabulary": train_vocab, "guard_threshold": choice,
           "metrics": metrics, "paired_f1": comps, "guard_effect": effect, "generation_failures": failures,
           "mean_generation_seconds": secs, "goals": goals,
           "examples": {k: {s: systems[s][k] for s in SYSTEMS} | {"truth": truths[k]["findings"],
                                                                  "guard_flags": flags[k]} for k in test[:5]}}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "report_eval.json"), json.dumps(_clean(res), indent=1))
    _plot(res, os.path.join(out, "report_eval.png"))
    return res


def save_guard(report_model: str, res: dict[str, Any]) -> str:
    """Store the guard threshold chosen on validation (and its vocabulary) with the report model,
    where `neurovfm report` / `analyze --report` pick it up."""
    from ..models.folder import write_json

    path = os.path.join(report_model, "guard.json")
    write_json(path, {"threshold": res["guard_threshold"]["threshold"], "vocabulary": res["vocabulary"],
                      "chosen_on": "val", "rule": res["guard_threshold"].get("rule"),
                      "within_budget": res["guard_threshold"].get("within_budget")})
    return path


def _clean(o):
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _clean(o.item())
    return o


def _plot(res: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    keys = [("f1", "F1"), ("hallucination_rate", "hallucination"), ("laterality_error_rate", "laterality error"),
            ("urgent_miss_rate", "urgent miss")]
    for i, (k, title) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        vals = [res["metrics"][s].get(k) for s in SYSTEMS]
        vals = [v if v is not None and np.isfinite(v) else 0.0 for v in vals]
        ax.bar(range(len(SYSTEMS)), vals, color=["#3b6", "#999", "#68c", "#c63"])
        if k == "f1":
            ci = [res["metrics"][s]["f1_ci"] for s in SYSTEMS]
            ax.errorbar(range(len(SYSTEMS)), vals, yerr=[[max(0, v - (c.get("low") or v)) for v, c in zip(vals, ci)],
                                                         [max(0, (c.get("high") or v) - v) for v, c in zip(vals, ci)]],
                        fmt="none", color="k", capsize=3)
        ax.set_xticks(range(len(SYSTEMS)), ["a", "b", "c", "d"])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Findings reports on the test split: (a) image, (b) indication only, (c) head template, (d) guarded",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
