"""Findings reports: vision-language plumbing (issue 7, in progress)."""
from .connector import Connector
from .resampler import PerceiverResampler, ResamplerConfig
from .vlm import ReportVLM, ReportVLMConfig

__all__ = ["Connector", "PerceiverResampler", "ResamplerConfig", "ReportVLM", "ReportVLMConfig"]
