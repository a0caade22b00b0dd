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


def read_yaml(path: str, error: type[Exception]) -> dict:
    """A YAML file that must hold a mapping; every problem is `error` naming the file."""
    import yaml

    try:
        with open(path) as fh:
            d = yaml.safe_load(fh) or {}
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: must be a mapping of config fields, not {type(d).__name__}")
    return d
