"""Evaluation: metrics, calibration, the evaluate command and its report."""
