"""The metadata allowlist: the only per-series facts that reach the cache.

Kept: modality, sequence family or kernel class, contrast/CTA/perfusion flags, geometry,
acquisition parameters, scanner make and model, patient sex, age in years capped at 90, body
part. Everything else in a header is dropped, raw series descriptions included; ids are keyed
hashes made elsewhere. Adding a field here is a privacy decision: say why in the commit.
"""

from __future__ import annotations

import json
from typing import Any

from neurovfm.ingest.classify import SeriesClass
from neurovfm.ingest.geometry import CanonicalVolume

ALLOWED_ATTRS = (
    "repetition_time_ms", "inversion_time_ms", "flip_angle_deg", "field_strength_t", "kvp",
    "manufacturer", "model", "sex", "age_years", "body_part",
)


def _r(v: Any, nd: int = 3) -> Any:
    return None if v is None else round(float(v), nd)


def series_metadata(attrs: dict[str, Any], cls: SeriesClass, cv: CanonicalVolume, first: Any,
                    source_format: str, echo_time_ms: float | None = None,
                    slice_thickness: float | None = None) -> dict[str, Any]:
    """Allowlisted metadata of one series (no identifiers; keys are added by the caller)."""
    out: dict[str, Any] = {k: attrs.get(k) for k in ALLOWED_ATTRS}
    age = out.get("age_years")
    if age is not None:
        out["age_years"] = int(min(max(int(age), 0), 90))
    sex = str(out.get("sex") or "U")[:1].upper()
    out["sex"] = sex if sex in ("M", "F", "O") else "U"
    if first is not None:
        echo_time_ms = first.echo_time
        slice_thickness = first.slice_thickness
        b_value = first.b_value
    else:
        b_value = None
    out.update(
        source_format=source_format,
        modality=cls.modality,
        sequence=cls.sequence or None,
        kernel=cls.kernel or None,
        contrast=int(cls.contrast),
        cta=int(cls.cta),
        perfusion=int(cls.perfusion),
        plane=cv.plane,
        tilt_corrected=int(cv.tilt_corrected),
        oblique_deg=_r(cv.oblique_deg, 2),
        source_shape=json.dumps(list(cv.source_shape)),
        source_spacing=json.dumps([_r(v, 4) for v in cv.source_spacing]),
        slice_thickness_mm=_r(slice_thickness),
        echo_time_ms=_r(echo_time_ms),
        b_value=_r(b_value, 1),
    )
    for k in ("repetition_time_ms", "inversion_time_ms", "flip_angle_deg", "field_strength_t", "kvp"):
        out[k] = _r(out.get(k))
    return out
