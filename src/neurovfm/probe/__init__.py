"""Frozen-encoder features and study-level heads."""
