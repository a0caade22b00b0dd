"""``neurovfm analyze``: one study folder (or NIfTI file) -> findings, calibrated probabilities,
decisions, triage and maps that open over the original scan.

The path is the archive's path, in memory: the ingest code that fills the cache (discovery,
series grouping, classification, canonical geometry, tokens), the encoder pass that ``embed``
uses, the heads with the calibration and operating points that ``evaluate --save-model`` stored,
the triage rule of the evaluation. Nothing is written outside OUT, and nothing identifying is
written inside it: series are numbered, file paths stay on the terminal, keys use a per-run secret.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from neurovfm import __version__
from neurovfm.analyze.config import HEAD_BODY_PARTS, AnalyzeConfig
from neurovfm.analyze.ood import load_ood
from neurovfm.errors import IngestError, NeuroVFMError
from neurovfm.eval import calibrate as cal
from neurovfm.explain import MAP_SOURCES, TOKEN_MAPS
from neurovfm.explain import maps as M
from neurovfm.explain.fusion import fuse_series_maps
from neurovfm.ingest.nifti import is_nifti
from neurovfm.ingest.pipeline import Unit, discover, process_unit
from neurovfm.ingest.policy import DEFAULT_POLICY
from neurovfm.models.folder import ModelFolderError, load_encoder, read_config, read_provenance
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.context import ContextError, check_cross_series, check_radius
from neurovfm.probe.embed import encode_views, encoder_id, head_inputs
from neurovfm.probe.heads import head_input_dim
from neurovfm.probe.train import load_head
from neurovfm.synth import tables
from neurovfm.tokens.cache import as_views, atomic_write_text

RESULT_FORMAT = "neurovfm-result"
RESULT_VERSION = 1
HEAD_OTSU_FACTOR = 0.5  # MR head mask for the mid-sagittal plane: half of Otsu's cut keeps dark scalp and CSF
DISCLAIMER = ("Research use only. Not a medical device. The shipped demo model is trained on synthetic data; "
              "do not use its output for patient care.")


class AnalyzeError(NeuroVFMError):
    """The study could not be analysed at all (bad path, unusable model)."""


def default_model_path() -> str:
    """The small demo model shipped inside the package (see its provenance.json)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")


@dataclass
class SeriesInput:
    """One usable series of the study: allowlisted metadata, tokens and its native source."""

    name: str
    meta: dict[str, Any]
    ts: Any  # TokenizedSeries
    source: Any  # PlaneSource (geometry + planes)
    warnings: list[dict[str, Any]] = field(default_factory=list)


def _warn(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **extra}


def read_study(path: str, cfg: AnalyzeConfig, log=None) -> tuple[list[SeriesInput], list[dict[str, Any]]]:
    """Ingest a study in memory with the cache's code; refusals become warnings."""
    if not os.path.exists(path):
        raise AnalyzeError(f"{path}: no such study folder or file")
    keyer = Keyer(os.urandom(32))  # per-run keys: nothing links this output to the archive
    warnings: list[dict[str, Any]] = []
    if os.path.isdir(path):
        units, file_errors = discover(path, None, progress=False)
        root = os.path.abspath(path)
    elif is_nifti(path):
        root = os.path.dirname(os.path.abspath(path))
        units, file_errors = [Unit("nifti", "study", path=os.path.abspath(path), relpath=os.path.basename(path))], []
    else:
        raise AnalyzeError(f"{path}: not a folder and not a NIfTI file (.nii / .nii.gz)")
    for e in file_errors:
        warnings.append(_warn("file_refused", f"a file was not read: {e.reason}", detail=e.code))
        if log:
            log(f"  refused {os.path.relpath(e.path or '', root)}: {e.reason}")
    series: list[SeriesInput] = []
    for u in units:
        try:
            res = process_unit(u, DEFAULT_POLICY, cfg.modality, keyer.secret, keep_sources=True)
        except IngestError as e:  # process_unit reports per series; this is a last resort
            res = None
            warnings.append(_warn("series_refused", e.reason, detail=e.code))
        if res is None:
            continue
        for r in res.refusals:
            warnings.append(_warn("series_refused" if r["status"] != "skipped" else "series_skipped",
                                  f"a {'series' if r.get('kind') == 'series' else 'file'} was "
                                  f"{'skipped' if r['status'] == 'skipped' else 'not usable'}: {r['reason']}",
                                  detail=r["code"]))
            if log and res.where:
                log(f"  {r['status']} {os.path.relpath(res.where, root)}: {r['reason']}")
        for (meta, ts), src in zip(res.rows, res.sources):
            series.append(SeriesInput("", meta, ts, src))
    series.sort(key=lambda s: (s.meta["modality"], s.meta.get("sequence") or s.meta.get("kernel") or "", s.meta["plane"]))
    for i, s in enumerate(series):
        tag = s.meta.get("sequence") or s.meta.get("kernel") or ""
        s.name = f"s{i + 1:02d}_{s.meta['modality']}{'_' + tag if tag else ''}_{s.meta['plane']}"
    return series, warnings


def _series_warnings(s: SeriesInput, cfg: AnalyzeConfig, width_mm: float | None) -> list[dict[str, Any]]:
    m, out = s.meta, []
    part = str(m.get("body_part") or "").upper().replace(" ", "")
    if part not in HEAD_BODY_PARTS:
        out.append(_warn("body_part", f"body part in the header is {part!r}, not head: the model knows head CT "
                                      "and brain MRI only", series=s.name))
    if width_mm is not None and width_mm > cfg.max_head_width_mm:
        out.append(_warn("body_part", f"the scanned body part is {width_mm:.0f} mm wide left-right; a head is "
                                      f"about 130-190 mm (limit {cfg.max_head_width_mm:.0f})", series=s.name))
    age = m.get("age_years")
    if age is not None and age < cfg.min_adult_age:
        out.append(_warn("pediatric", f"patient age {age} is below {cfg.min_adult_age}: the model was trained on adults",
                         series=s.name))
    if m["modality"] == "MR" and (m.get("sequence") in (None, "", "other")):
        out.append(_warn("unknown_sequence", "MR sequence not recognised from the headers", series=s.name))
    th = m.get("slice_thickness_mm")
    if th is not None and th > cfg.max_slice_thickness_mm:
        out.append(_warn("thick_slices", f"slices are {th:.1f} mm thick (> {cfg.max_slice_thickness_mm:.0f} mm): "
                                         "small findings may be missed", series=s.name))
    return out


def _native_volume(src: Any) -> np.ndarray:
    if hasattr(src, "volume"):  # RememberedPlanes: the planes ingestion already decoded
        return src.volume()
    g = src.geometry
    vol = np.empty(tuple(g.shape), np.float32)
    for k in range(g.shape[2]):
        vol[:, :, k] = src.plane(k)
    return vol


def _foreground_threshold(modality: str, vol: np.ndarray) -> float:
    if modality == "CT":
        return float(DEFAULT_POLICY.ct_background_hu)
    return HEAD_OTSU_FACTOR * M.otsu_threshold(vol)


def _display_window(modality: str, vol: np.ndarray) -> tuple[float, float]:
    if modality == "CT":
        return (0.0, 80.0)  # brain window W 80 / L 40
    lo, hi = np.percentile(vol, [1, 99.5])
    return float(lo), float(hi)


@dataclass
class ExamScores:
    """What the model says about one modality's series of a study (see :meth:`Analyzer.score`)."""

    modality: str
    labels: list[str]
    p_raw: np.ndarray
    p_cal: np.ndarray
    thresholds: dict[str, float]
    acuity: dict[str, str]
    level: str
    decided: list[str]
    drivers: list[str]
    per_series_w: list[np.ndarray]  # per series [n_tokens, C]: map weights (see map_source) summed over its views
    n_tokens: int  # foreground tokens of the series (each counted once, not once per CT window)
    ood: dict[str, Any] | None
    view_features: list = field(default_factory=list)  # encoder tokens per series view (the report's input)
    map_source: str = "head"  # the kind of map per_series_w holds


def exam_views(mod: str, group: list[SeriesInput]) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], list[int]]:
    """The encoder's inputs for one modality's series: one (uint8 tokens, grid coords, view name)
    per series view (a CT series has one per window; every MR view is "mr"), and the index of the
    series each view belongs to."""
    views, owner = [], []
    for si, s in enumerate(group):
        u8, names = as_views(s.ts.tokens, s.ts.storage, s.ts.views, DEFAULT_POLICY)
        for vi, vname in enumerate(names):
            views.append((u8[:, vi], s.ts.coords, vname if mod == "CT" else "mr"))
            owner.append(si)
    return views, owner


def row_order(row: dict[str, Any]) -> tuple[bool, float]:
    """How an exam's label rows are listed (result.json, and so summary.html): labels with an
    operating point first, most probable first; then those without one (no positives in the model's
    validation split: the probability is not calibrated and no decision is possible)."""
    return row["threshold"] is None, -row["calibrated_probability"]


def map_labels(labels: list[str], p_cal: np.ndarray, thresholds: dict[str, float], top_k: int | None) -> list[str]:
    """The labels to draw maps for, most probable first: with ``top_k``, the ``top_k`` highest
    calibrated probabilities among labels that have an operating point. A label without one had no
    validation positives, so its probability is not calibrated (Platt falls back to the identity)
    and an untrained head output near 0.5 would outrank real findings; such labels are mapped only
    with ``--maps all``, or when no label of the head has an operating point."""
    order = [int(j) for j in np.argsort(-np.asarray(p_cal), kind="stable")]
    if top_k is None:
        return [labels[j] for j in order]
    known = [j for j in order if thresholds.get(labels[j]) is not None and np.isfinite(thresholds[labels[j]])]
    return [labels[j] for j in (known or order)[:top_k]]


class Analyzer:
    """A loaded model (encoder, heads, calibration, operating points, distance-to-training) that
    analyses studies one after another (worklists load it once)."""

    def __init__(self, model: str | None = None, cfg: AnalyzeConfig | None = None, reporter=None):
        self.cfg = cfg or AnalyzeConfig()
        self.reporter = reporter    # report.generate.Reporter: a findings report per exam (optional)
        self._indication: str | None = None
        self.model = os.path.abspath(model or default_model_path())
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise AnalyzeError(f"{self.model}: no model here (no config.json); pass --model MODEL_FOLDER")
        t = time.perf_counter()
        self.config = read_config(self.model)
        self.encoder = load_encoder(self.model, map_location=self.cfg.device, attention=self.cfg.attention).eval()
        self.heads: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
        for mod in ("CT", "MR"):
            if f"head_{mod.lower()}" in self.config.get("heads", {}):
                self.heads[mod] = load_head(self.model, f"head_{mod.lower()}")
        if not self.heads:
            raise AnalyzeError(f"{self.model}: the model has no diagnosis heads (train them with "
                               "`neurovfm evaluate ... --save-model MODEL`)")
        self.ood = {mod: load_ood(self.model, mod) for mod in ("CT", "MR")}
        for mod, (head, _) in self.heads.items():
            ood = self.ood.get(mod)
            if ood is not None and len(ood.mean) != head_input_dim(head):
                raise AnalyzeError(f"{self.model}: the {mod} distance-to-training model reads {len(ood.mean)}-wide "
                                   f"features but head_{mod.lower()} reads {head_input_dim(head)}; save both from "
                                   "the same features with `neurovfm evaluate ... --save-model`")
        prov = read_provenance(self.model)
        self.model_info = {"encoder_id": encoder_id(self.model), "name": os.path.basename(self.model.rstrip("/")),
                           "code_version": __version__, "trained": {k: prov.get(k) for k in ("created", "command")},
                           "synthetic_training_data": bool(self.config.get("demo", {}).get("synthetic", False))}
        for mod, (_, hmeta) in self.heads.items():
            fitted_on = (hmeta.get("features") or {}).get("encoder_id")
            radius = (hmeta.get("features") or {}).get("context_radius")
            cross = (hmeta.get("features") or {}).get("cross_series_mm")
            try:
                if radius is not None:
                    check_radius(radius)
                if cross is not None:
                    check_cross_series(cross)
            except ContextError as e:
                raise AnalyzeError(f"{self.model}: head_{mod.lower()}'s features record a bad neighbourhood or "
                                   f"cross-series distance: {e}") from None
            recorded = hmeta.get("map_source")
            if recorded is not None and recorded not in MAP_SOURCES:
                raise AnalyzeError(f"{self.model}: head_{mod.lower()} records the map {recorded!r}, which is none "
                                   f"of {', '.join(MAP_SOURCES)}")
            if fitted_on and fitted_on != self.model_info["encoder_id"]:
                raise AnalyzeError(f"{self.model}: head_{mod.lower()} was fitted on features of encoder "
                                   f"{fitted_on[:12]}, but this folder's encoder is "
                                   f"{self.model_info['encoder_id'][:12]}; save the heads again with "
                                   "`neurovfm evaluate ... --save-model` from this encoder's features")
        self.check_map_source(self.cfg.map_source)
        self.load_s = time.perf_counter() - t
        self._progress = lambda step, fraction: None

    def map_source_for(self, mod: str, source: str | None = None) -> str:
        """The map a head draws: ``source`` if given, else the config's, else the one its model
        folder records (chosen on validation), else the head's attention."""
        return source or self.cfg.map_source or self.heads[mod][1].get("map_source") or "head"

    def check_map_source(self, source: str | None) -> None:
        """Refuse a map source some head cannot draw, before any study is read (``token`` maps
        need a token classifier, which mean-pooling heads lack: asked of ``heads.token_logits``,
        the function that draws the map, on one zero token). ``None``: each head's own choice."""
        from neurovfm.probe.heads import token_logits

        for mod, (head, hmeta) in self.heads.items():
            if self.map_source_for(mod, source) not in TOKEN_MAPS:
                continue
            with torch.inference_mode():
                none = token_logits(head, torch.zeros(1, head_input_dim(head))) is None
            if none:
                raise AnalyzeError(f"{self.model}: the {mod} head ({hmeta['head']['kind']}) has no token "
                                   "classifier; use --map-source head or contribution")

    # -- one study ------------------------------------------------------------------------------
    def run(self, study: str, out: str, log=None, progress=None, indication: str | None = None) -> dict[str, Any]:
        """Analyse one study into ``out``. ``progress(step, fraction)``, if given, is called as the
        work advances (the web viewer shows it). ``indication`` (free text) only conditions the
        report; it is never written out."""
        cfg = self.cfg
        self._indication = indication
        self._progress = progress or (lambda step, fraction: None)
        self._progress("reading the study", 0.02)
        os.makedirs(out, exist_ok=True)
        # the model load counts once, on the first study (a worklist or the server loads it once)
        load_s, self.load_s = self.load_s, 0.0
        timings: dict[str, float] = {"load_model": round(load_s, 3)}
        t0 = time.perf_counter()
        series, warnings = read_study(study, cfg, log)
        timings["ingest"] = time.perf_counter() - t0
        exams = []
        self._progress("encoding", 0.3)
        if not series:
            warnings.append(_warn("no_series", "no usable head CT or brain MRI series in this input"))
        for mod in ("CT", "MR"):
            group = [s for s in series if s.meta["modality"] == mod]
            if not group:
                continue
            if mod not in self.heads:
                warnings.append(_warn("no_head", f"the model has no {mod} head; {len(group)} {mod} series not analysed"))
                continue
            exams.append(self._exam(mod, group, out, timings, warnings))
        self._progress("writing the result", 0.97)
        timings["total"] = time.perf_counter() - t0 + load_s
        result = {
            "format": RESULT_FORMAT, "format_version": RESULT_VERSION, "disclaimer": DISCLAIMER,
            "model": self.model_info, "options": {k: v for k, v in cfg.to_dict().items() if k != "progress"},
            "exams": exams, "warnings": warnings,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        atomic_write_text(os.path.join(out, "result.json"), json.dumps(result, indent=1))
        from neurovfm.analyze.summary import write_summary

        write_summary(out, result)
        return result

    def score(self, mod: str, group: list[SeriesInput], timings: dict[str, float] | None = None,
              view_features: list | None = None, map_source: str | None = None) -> "ExamScores":
        """Encoder -> head -> calibration -> decisions -> triage for one modality's series, and each
        series' per-token map weights (summed over its views): everything but files.
        ``view_features`` (a previous call's) skips the encoder; ``map_source`` overrides the
        config's, so several kinds of map can come from one encoding."""
        timings = timings if timings is not None else {}
        cfg = self.cfg
        map_source = self.map_source_for(mod, map_source)
        head, hmeta = self.heads[mod]
        labels: list[str] = hmeta["labels"]
        readout = (hmeta.get("features") or {}).get("readout_layers")  # the blocks the head was fitted on
        t = time.perf_counter()
        views, owner = exam_views(mod, group)
        if view_features is not None:
            feats = list(view_features)
        else:
            with torch.inference_mode():
                feats = encode_views(self.encoder, views, cfg.tokens_per_batch, cfg.device, readout=readout)
        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        fitted = hmeta.get("features") or {}  # embed --append-histogram / --append-context
        cross = fitted.get("cross_series_mm")  # add-context --cross-series: every view of the exam at once
        centres = [M.token_centres_ras(group[o].ts.grid_affine, c) for (_, c, _), o in zip(views, owner)] if cross else None
        head_in = head_inputs(feats, views, fitted.get("histogram_bins"), fitted.get("context_radius"), cross, centres,
                              owner)
        bag = torch.from_numpy(np.concatenate(head_in).astype(np.float32))
        n_tok = int(bag.shape[0])
        with torch.inference_mode():
            logits, attn = head(bag, torch.tensor([0, n_tok]))
        logit = logits[0].double().numpy()
        attn = attn.double().numpy()  # [T, C], sums to one per class
        if map_source == "contribution":  # tokens that pushed each logit up, as a distribution
            from neurovfm.probe.heads import token_contributions

            contrib = np.clip(token_contributions(head, bag, torch.tensor([0, n_tok])).double().numpy(), 0, None)
            tot = contrib.sum(0, keepdims=True)
            attn = np.divide(contrib, tot, out=np.zeros_like(contrib), where=tot > 0)
        if map_source in TOKEN_MAPS:  # each token's own probability of the finding, as a distribution
            from neurovfm.probe.heads import token_logits

            with torch.inference_mode():
                tl = token_logits(head, bag)
            if tl is None:
                raise AnalyzeError(f"the {mod} head ({hmeta['head']['kind']}) has no token classifier; "
                                   "use --map-source head or contribution")
            prob = cal.sigmoid(tl.double().numpy())
            attn = prob / prob.sum(0, keepdims=True)
        if map_source == "rollout":  # the head's weights on outputs, carried back to input tokens
            from neurovfm.explain.rollout import rollout_attention

            attn = rollout_attention(self.encoder, views, attn, readout)
        p_raw = cal.sigmoid(logit)
        calib = hmeta.get("calibration")
        p_cal = cal.scaler_from_dict(calib).transform(logit[None])[0] if calib else p_raw
        thr = hmeta["thresholds"]
        acuity = {lab: _acuity(mod, lab) for lab in labels}
        level = cal.triage_levels(p_cal[None], labels, thr, acuity)[0]
        decided = [lab for j, lab in enumerate(labels) if p_cal[j] >= thr.get(lab, float("inf"))]
        drivers = sorted([lab for lab in decided if acuity[lab] == level],
                         key=lambda lab: -p_cal[labels.index(lab)]) if level != "Normal" else []
        offs = np.cumsum([0] + [len(f) for f in feats])
        per_series_w = []
        for si, s in enumerate(group):
            w = np.zeros((s.ts.n_tokens, len(labels)))
            for vi, o in enumerate(owner):
                if o == si:
                    w += attn[offs[vi]:offs[vi + 1]]
            per_series_w.append(w)
        if map_source == "token-fused":  # with the co-located tokens of the study's other series
            per_series_w = fuse_series_maps(per_series_w, [M.token_centres_ras(s.ts.grid_affine, s.ts.coords)
                                                            for s in group])
            tot = sum(w.sum(0) for w in per_series_w)
            per_series_w = [np.divide(w, tot, out=np.zeros_like(w), where=tot > 0) for w in per_series_w]
        ood = None
        ood_m = self.ood.get(mod)
        if ood_m is not None:
            score = float(ood_m.score(bag.numpy().mean(0))[0])
            ood = {"score": round(score, 4), "threshold": round(ood_m.threshold, 4), "quantile": ood_m.quantile,
                   "outside": bool(score > ood_m.threshold)}
        timings["heads"] = timings.get("heads", 0.0) + time.perf_counter() - t
        n_fg = int(sum(s.ts.n_tokens for s in group))
        return ExamScores(mod, labels, p_raw, p_cal, thr, acuity, level, decided, drivers, per_series_w, n_fg, ood,
                          list(feats), map_source)

    def _exam(self, mod: str, group: list[SeriesInput], out: str, timings: dict[str, float],
              warnings: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        # -- native volumes, mid-sagittal planes, series warnings
        t = time.perf_counter()
        natives, planes = {}, {}
        for s in group:
            vol = _native_volume(s.source)
            pts = M.head_points_ras(vol, s.source.geometry, _foreground_threshold(mod, vol))
            planes[s.name] = M.estimate_midplane(pts)
            width = planes[s.name].width_mm if len(pts) else None
            natives[s.name] = vol
            s.warnings = _series_warnings(s, cfg, width)
            warnings.extend(s.warnings)
        timings["geometry"] = timings.get("geometry", 0.0) + time.perf_counter() - t
        self._progress(f"{mod}: encoder and heads", 0.45)
        sc = self.score(mod, group, timings)
        labels, thr = sc.labels, sc.thresholds
        if sc.ood is not None and sc.ood["outside"]:
            warnings.append(_warn("out_of_distribution",
                                  f"{mod} study is far from the training data (score {sc.ood['score']:.2f} > "
                                  f"{sc.ood['threshold']:.2f}, the {sc.ood['quantile']:.0%} quantile on validation)"))
        if sc.n_tokens < cfg.min_study_tokens:
            warnings.append(_warn("few_tokens", f"{mod} study has only {sc.n_tokens} foreground tokens "
                                                f"(< {cfg.min_study_tokens}): too little of a head to judge"))
        # -- side of every label's map, then the files for the mapped labels
        self._progress(f"{mod} maps", 0.7)
        t = time.perf_counter()
        all_w = np.concatenate(sc.per_series_w)
        all_d = np.concatenate([planes[s.name].distance(M.token_centres_ras(s.ts.grid_affine, s.ts.coords))
                                for s in group])
        rows = []
        for j, lab in enumerate(labels):
            side, shares = M.side_from_distances(all_w[:, j], all_d, cfg.side)
            rows.append({"label": lab, "probability": round(float(sc.p_raw[j]), 5),
                         "calibrated_probability": round(float(sc.p_cal[j]), 5),
                         "threshold": None if not np.isfinite(thr.get(lab, np.inf)) else round(float(thr[lab]), 5),
                         "decision": bool(lab in sc.decided), "acuity": sc.acuity[lab], "side": side,
                         "side_shares": shares})
        to_map = [] if cfg.maps == "none" else map_labels(labels, sc.p_cal, thr, None if cfg.maps == "all" else cfg.top_k)
        map_files = self._write_maps(mod, group, natives, planes, sc.per_series_w, labels, to_map, sc.p_cal, out)
        for r in rows:
            r["maps"] = map_files.get(r["label"], {})
        timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - t
        rows.sort(key=row_order)
        report = None
        if self.reporter is not None:
            want = self.reporter.cfg.get("encoder_id")
            if want and want != self.model_info["encoder_id"]:
                warnings.append(_warn("report_encoder_mismatch",
                                      "the report model was trained on another encoder's features than this "
                                      "model's; its report is unreliable"))
            self._progress(f"{mod}: findings report", 0.85)
            t = time.perf_counter()
            report = self.reporter.report(sc.view_features, mod, rows, self._indication)
            timings["report"] = timings.get("report", 0.0) + time.perf_counter() - t
        exam = {
            "modality": mod, "n_tokens": sc.n_tokens,
            "series": [{"name": s.name, "plane": s.meta["plane"], "sequence": s.meta.get("sequence"),
                        "kernel": s.meta.get("kernel"), "contrast": bool(s.meta.get("contrast")),
                        "slice_thickness_mm": s.meta.get("slice_thickness_mm"), "n_tokens": s.ts.n_tokens,
                        "image": f"{s.name}_image.nii.gz",
                        "midplane": {"a": round(planes[s.name].a, 2), "b": round(planes[s.name].b, 4),
                                     "c": round(planes[s.name].c, 4), "rows": planes[s.name].rows,
                                     "head_width_mm": round(planes[s.name].width_mm, 1)},
                        "warnings": [w["code"] for w in s.warnings]} for s in group],
            "triage": {"level": sc.level, "drivers": sc.drivers},
            "findings": [r["label"] for r in rows if r["decision"]],
            "labels": rows, "distance_to_training": sc.ood, "map_source": sc.map_source,
        }
        if report is not None:
            exam["report"] = report
        return exam

    def _write_maps(self, mod, group, natives, planes, per_series_w, labels, to_map, p_cal, out) -> dict:
        files: dict[str, dict[str, Any]] = {}
        index: dict[str, np.ndarray] = {}  # native voxel -> token grid, once per series
        for s in group:
            M.save_nifti(os.path.join(out, f"{s.name}_image.nii.gz"), natives[s.name], M.native_affine(s.source.geometry))
        for lab in to_map:
            j = labels.index(lab)
            masses = [float(w[:, j].sum()) for w in per_series_w]
            peak = max(float(w[:, j].max()) if len(w) else 0.0 for w in per_series_w) or 1.0
            entry: dict[str, Any] = {"nifti": {}}
            best = int(np.argmax(masses))
            for si, s in enumerate(group):
                if s.name not in index:
                    index[s.name] = M.native_grid_index(s.ts.grid_affine, s.source.geometry)
                grid = M.dense_grid(s.ts.coords, per_series_w[si][:, j] / peak, s.ts.grid_shape)
                heat = M.project_to_native(grid, index[s.name])
                fn = f"{s.name}_map_{lab}.nii.gz"
                M.save_nifti(os.path.join(out, fn), heat, M.native_affine(s.source.geometry), kind="map")
                entry["nifti"][s.name] = fn
                if si == best:
                    png = f"{s.name}_map_{lab}.png"
                    M.montage_png(os.path.join(out, png), natives[s.name], heat, s.source.geometry,
                                  f"{lab}  p={p_cal[j]:.2f}  ({s.name})", _display_window(mod, natives[s.name]),
                                  planes[s.name])
                    entry["png"] = png
                    entry["series"] = s.name
            files[lab] = entry
        return files


def _acuity(mod: str, label: str) -> str:
    try:
        return tables.acuity(mod, label)
    except Exception:  # a custom label set: unknown labels count as Routine
        return "Routine"


def set_map_sources(model: str, choices: dict[str, str]) -> dict[str, Any]:
    """Record in a model folder the map each named head draws by default (``{"MR": "token-fused"}``;
    a choice made on the validation split, e.g. with ``neurovfm pointing --split val --map-sources
    head,token-fused``). Every choice is checked first and the folder written once, so one bad choice
    (an unknown map, a missing head, a head that cannot draw the map) leaves the folder as it was."""
    from neurovfm.models.folder import update_config
    from neurovfm.probe.heads import token_logits

    try:
        heads = read_config(model).get("heads", {})
    except ModelFolderError as e:
        raise AnalyzeError(str(e)) from None
    for mod, source in choices.items():
        mod = mod.upper()
        if source not in MAP_SOURCES:
            raise AnalyzeError(f"{source!r} is not a map ({', '.join(MAP_SOURCES)})")
        key = f"head_{mod.lower()}"
        if key not in heads:
            raise AnalyzeError(f"{model}: no {key} (heads: {', '.join(sorted(heads)) or 'none'})")
        if source in TOKEN_MAPS:
            try:
                head, meta = load_head(model, key)
            except ModelFolderError as e:
                raise AnalyzeError(str(e)) from None
            with torch.inference_mode():
                if token_logits(head, torch.zeros(1, head_input_dim(head))) is None:
                    raise AnalyzeError(f"{model}: the {mod} head ({meta['head']['kind']}) has no token classifier "
                                       f"to draw a {source} map")
    for mod, source in choices.items():
        key = f"head_{mod.lower()}"
        heads[key] = {**heads[key], "map_source": source}
    update_config(model, heads=heads)
    return heads


def set_map_source(model: str, mod: str, source: str) -> dict[str, Any]:
    """One head's default map (``set_map_sources`` with one choice); returns that head's entry."""
    return set_map_sources(model, {mod: source})[f"head_{mod.lower()}"]


def analyze(study: str, out: str, model: str | None = None, cfg: AnalyzeConfig | None = None, log=None) -> dict:
    """Analyse one study (see the module doc)."""
    return Analyzer(model, cfg).run(study, out, log)


def read_worklist(spec: str) -> list[str]:
    """Studies of a worklist: a text file of paths (one per line, # comments) or a folder whose
    sub-folders are studies."""
    if os.path.isdir(spec):
        subs = sorted(os.path.join(spec, d) for d in os.listdir(spec)
                      if not d.startswith(".") and os.path.isdir(os.path.join(spec, d)))
        if not subs:
            raise AnalyzeError(f"{spec}: a worklist folder must hold one sub-folder per study")
        return subs
    if not os.path.isfile(spec):
        raise AnalyzeError(f"{spec}: worklist file not found")
    base = os.path.dirname(os.path.abspath(spec))
    out = []
    with open(spec) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
    if not out:
        raise AnalyzeError(f"{spec}: worklist is empty")
    return out


def analyze_worklist(studies: list[str], out: str, model: str | None = None, cfg: AnalyzeConfig | None = None,
                     progress: bool = True, reporter=None) -> str:
    """Analyse many studies with one loaded model; one sub-folder per study (numbered, not named
    after the input, which may carry a patient's name) and ``worklist.csv``."""
    import csv
    import io

    from tqdm import tqdm

    an = Analyzer(model, cfg, reporter)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, st in enumerate(tqdm(studies, desc="studies", unit="study", disable=not progress, file=sys.stderr)):
        sub = os.path.join(out, f"study{i + 1:04d}")
        row: dict[str, Any] = {"item": i + 1, "folder": os.path.basename(sub)}
        try:
            res = an.run(st, sub)
            row.update(status="ok", modalities="+".join(e["modality"] for e in res["exams"]),
                       triage=_worst([e["triage"]["level"] for e in res["exams"]]),
                       findings=";".join(f for e in res["exams"] for f in e["findings"]),
                       warnings=";".join(sorted({w["code"] for w in res["warnings"]})),
                       seconds=res["timings_s"]["total"])
        except NeuroVFMError as e:
            row.update(status="error", warnings=str(e).replace(st, f"item {i + 1}"))
        rows.append(row)
    buf = io.StringIO()
    cols = ["item", "folder", "status", "modalities", "triage", "findings", "warnings", "seconds"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    path = os.path.join(out, "worklist.csv")
    atomic_write_text(path, buf.getvalue())
    return path


def _worst(levels: list[str]) -> str:
    for lv in cal.ACUITY_LEVELS:
        if lv in levels:
            return lv
    return "" if not levels else levels[0]


__all__ = ["AnalyzeConfig", "Analyzer", "AnalyzeError", "analyze", "analyze_worklist", "read_worklist",
           "default_model_path", "ModelFolderError"]
