"""Embedded data: writers and generators for the project's own DICOM/NIfTI archives."""
