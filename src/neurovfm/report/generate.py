"""Reports for one study at inference: generator + consistency guard, as `analyze --report` and
`neurovfm report` run them.

The guard's threshold and vocabulary come from ``guard.json`` in the report model folder
(written by `neurovfm report-eval`, chosen on the validation split); without it, the head's own
per-label operating points are used.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch

from .constrained import ReportGrammar
from .data import MAX_VIEWS, subsample_tokens
from .evaluation import safe_triage
from .folder import ReportModelError, default_report_model, load_report_model
from .guard import apply_guard

GUARD_FILE = "guard.json"


class Reporter:
    """A loaded report model; `report()` turns one exam's encoder features + head output into a
    structured report, the guard's flags, and the triage the report implies."""

    def __init__(self, folder: str | None = None, llm: str | None = None, num_beams: int = 1, guard: bool = True):
        t = time.perf_counter()
        folder = folder or default_report_model()
        self.folder = folder
        self.vlm, self.schema, self.cfg = load_report_model(folder, llm)
        self.grammar = ReportGrammar(self.schema, self.vlm.tokenizer)
        self.num_beams = num_beams
        self.guard = guard
        g = {}
        path = os.path.join(folder, GUARD_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as fh:
                    g = json.load(fh)
            except json.JSONDecodeError as e:
                raise ReportModelError(f"{path}: not valid JSON ({e.msg}); rerun `neurovfm report-eval`") from None
        self.guard_threshold = g.get("threshold")
        self.vocabulary = g.get("vocabulary") or self.cfg.get("finding_labels") or list(self.schema.labels)
        self.max_tokens = int(self.cfg.get("max_tokens_per_series") or 512)
        self.load_s = time.perf_counter() - t

    def _features(self, view_features: list[np.ndarray]) -> list[torch.Tensor]:
        return [subsample_tokens(f, self.max_tokens) for f in view_features[:MAX_VIEWS]]

    def report(self, view_features: list[np.ndarray], modality: str, head_rows: list[dict[str, Any]],
               indication: str | None = None) -> dict[str, Any]:
        t = time.perf_counter()
        feats = self._features(view_features) if self.cfg.get("use_images", True) else []
        raw = self.vlm.generate_report(feats, self.grammar, indication if self.cfg.get("use_indication", True) else None,
                                       num_beams=self.num_beams)
        thr = self.guard_threshold
        if thr is None:
            thr = {r["label"]: r["threshold"] for r in head_rows if r.get("threshold") is not None}
        guarded, flags = apply_guard(raw, head_rows, self.vocabulary, thr, add_missing=self.guard)
        final = guarded if self.guard else raw
        return {"report": final, "raw_report": raw, "guard_flags": flags,
                "triage": safe_triage(modality, [f["label"] for f in final["findings"]]),
                "model": os.path.basename(os.path.abspath(self.folder)), "num_beams": self.num_beams,
                "seconds": round(time.perf_counter() - t, 3)}
