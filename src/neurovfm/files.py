"""Small file helpers shared by stages that must not depend on each other."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (weights files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
