"""The structured findings report: its JSON schema, its vocabulary, and validation.

A report is ``{"exam_type", "findings": [{"label", "side", "size_mm", "description"}], "impression"}``.
Labels, sides and exam types are closed vocabularies (enums), so a generated report can be
matched to ground truth and to the diagnostic head without free-text parsing. The same schema
drives the constrained decoder (``constrained.py``), so every generated report validates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import NeuroVFMError

SIDES: tuple[str, ...] = ("left", "right", "bilateral", "midline")
EXAM_TYPES: tuple[str, ...] = ("CT head", "MRI brain")
MAX_FINDINGS = 12
MAX_SIZE_DIGITS = 3
MAX_DESCRIPTION_TOKENS = 16
MAX_IMPRESSION_TOKENS = 40
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')


class ReportSchemaError(NeuroVFMError):
    """A report does not follow the findings-report schema."""


class ReportGenerationError(NeuroVFMError):
    """Generation could not complete a report that follows the schema."""


@dataclass
class ReportSchema:
    """Closed vocabularies and length limits of a findings report."""
    labels: tuple[str, ...]
    sides: tuple[str, ...] = SIDES
    exam_types: tuple[str, ...] = EXAM_TYPES
    max_findings: int = MAX_FINDINGS
    max_size_digits: int = MAX_SIZE_DIGITS
    max_description_tokens: int = MAX_DESCRIPTION_TOKENS
    max_impression_tokens: int = MAX_IMPRESSION_TOKENS
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        self.sides = tuple(self.sides)
        self.exam_types = tuple(self.exam_types)
        for name in ("labels", "sides", "exam_types"):
            vals = getattr(self, name)
            if not vals or len(set(vals)) != len(vals):
                raise ReportSchemaError(f"ReportSchema.{name} must be non-empty and unique")
            bad = [v for v in vals if not v or _UNSAFE.search(v)]
            if bad:
                raise ReportSchemaError(f"ReportSchema.{name}: values with quotes/control characters: {bad[:3]}")
        if self.max_findings < 1 or self.max_size_digits < 1:
            raise ReportSchemaError("ReportSchema: max_findings and max_size_digits must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "sides": list(self.sides), "exam_types": list(self.exam_types),
                "max_findings": self.max_findings, "max_size_digits": self.max_size_digits,
                "max_description_tokens": self.max_description_tokens,
                "max_impression_tokens": self.max_impression_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReportSchema":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def json_schema(self) -> dict[str, Any]:
        """The equivalent JSON Schema (draft 2020-12), for users and other tools."""
        finding = {"type": "object", "additionalProperties": False,
                   "required": ["label", "side", "size_mm", "description"],
                   "properties": {"label": {"enum": list(self.labels)}, "side": {"enum": list(self.sides)},
                                  "size_mm": {"type": "integer", "minimum": 0,
                                              "maximum": 10 ** self.max_size_digits - 1},
                                  "description": {"type": "string"}}}
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                "additionalProperties": False, "required": ["exam_type", "findings", "impression"],
                "properties": {"exam_type": {"enum": list(self.exam_types)},
                               "findings": {"type": "array", "items": finding, "maxItems": self.max_findings},
                               "impression": {"type": "string"}}}


def clean_text(text: str) -> str:
    """Free text as the decoder can write it: ASCII, no quotes, backslashes or control characters."""
    text = text.encode("ascii", "ignore").decode()
    text = text.replace('"', "'").replace("\\", "/")
    return re.sub(r"\s+", " ", _UNSAFE.sub(" ", text)).strip()


def validate_report(report: Any, schema: ReportSchema, where: str = "report") -> dict[str, Any]:
    """Check a report against the schema; returns it, or raises ReportSchemaError naming the field."""
    def fail(msg: str) -> None:
        raise ReportSchemaError(f"{where}: {msg}")

    if not isinstance(report, dict):
        fail(f"must be an object, got {type(report).__name__}")
    core = {"exam_type", "findings", "impression"}
    missing = core - set(report)
    if missing:
        fail(f"missing fields {sorted(missing)}")
    if report["exam_type"] not in schema.exam_types:
        fail(f"exam_type {report['exam_type']!r} not in {list(schema.exam_types)}")
    if not isinstance(report["impression"], str):
        fail("impression must be a string")
    fs = report["findings"]
    if not isinstance(fs, list) or len(fs) > schema.max_findings:
        fail(f"findings must be a list of at most {schema.max_findings}")
    for i, f in enumerate(fs):
        if not isinstance(f, dict) or not {"label", "side", "size_mm", "description"} <= set(f):
            fail(f"findings[{i}] must hold label, side, size_mm, description")
        if f["label"] not in schema.labels:
            fail(f"findings[{i}].label {f['label']!r} is not a known label")
        if f["side"] not in schema.sides:
            fail(f"findings[{i}].side {f['side']!r} not in {list(schema.sides)}")
        if not isinstance(f["size_mm"], int) or isinstance(f["size_mm"], bool) or f["size_mm"] < 0:
            fail(f"findings[{i}].size_mm must be a non-negative integer")
        if not isinstance(f["description"], str):
            fail(f"findings[{i}].description must be a string")
    return report


def exam_type_for(modality: str) -> str:
    return EXAM_TYPES[0] if modality.upper() == "CT" else EXAM_TYPES[1]
