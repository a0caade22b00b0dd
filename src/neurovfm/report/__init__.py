"""Findings reports: per-series resampler -> connector -> local HF causal LM, schema-constrained
decoding, training (stage 1 connector, stage 2 LoRA), evaluation against ground truth, and the
consistency guard against the calibrated head (issue 7)."""
from .connector import Connector
from .resampler import PerceiverResampler, ResamplerConfig
from .schema import ReportGenerationError, ReportSchema, ReportSchemaError, validate_report
from .vlm import ReportVLM, ReportVLMConfig

__all__ = ["Connector", "PerceiverResampler", "ResamplerConfig", "ReportVLM", "ReportVLMConfig",
           "ReportSchema", "ReportSchemaError", "ReportGenerationError", "validate_report"]
