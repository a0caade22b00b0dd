"""neurovfm: health system learning for neuroimaging.

The package follows the data's path: ``ingest`` (DICOM/NIfTI -> canonical volume),
``tokens`` (windows, normalisation, patches, cache), ``privacy`` (keyed ids, allowlist,
PHI audit) and ``cli``. Later stages (models, pretrain, probe, explain, report, serve)
build on the token cache.
"""

__version__ = "0.1.0"
