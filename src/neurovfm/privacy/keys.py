"""Keyed hashes (HMAC-SHA256) for patient, study, series and source identifiers.

The site secret comes from ``NEUROVFM_SITE_SECRET`` or, if that is unset, from a file created
once at ``$XDG_CONFIG_HOME/neurovfm/site_secret`` (default ``~/.config/neurovfm/site_secret``,
mode 0600) and reused by every later command. Without the secret a key cannot be linked back
to an identifier, even by someone who knows the identifier; keep the secret out of the cache.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

ENV_VAR = "NEUROVFM_SITE_SECRET"
KEY_HEX = 20  # 80 bits: no collisions at archive scale


def secret_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "neurovfm", "site_secret")


def load_site_secret(create: bool = True) -> bytes:
    """The site secret (environment first, then the per-user file, created if absent)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env.encode()
    path = secret_path()
    if os.path.exists(path):
        with open(path, "rb") as fh:
            data = fh.read().strip()
        if data:
            return data
    if not create:
        raise FileNotFoundError(f"no site secret: set {ENV_VAR} or create {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    token = secrets.token_hex(32).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(token)
    try:
        os.link(tmp, path)  # first writer wins; a concurrent creator reads the winner's secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as fh:
        return fh.read().strip()


@dataclass(frozen=True)
class Keyer:
    """Makes keyed ids; ``kind`` separates namespaces so equal strings of different kinds differ."""

    secret: bytes

    @classmethod
    def from_site(cls) -> "Keyer":
        return cls(load_site_secret())

    def key(self, kind: str, value: str) -> str:
        mac = hmac.new(self.secret, f"{kind}\0{value}".encode("utf-8", "surrogatepass"), hashlib.sha256)
        return mac.hexdigest()[:KEY_HEX]

    def patient(self, patient_id: str) -> str:
        return self.key("patient", patient_id)

    def study(self, study_uid: str) -> str:
        return self.key("study", study_uid)

    def series(self, identity: str) -> str:
        return self.key("series", identity)

    def source(self, fingerprint: str) -> str:
        return self.key("source", fingerprint)

    def fingerprint(self) -> str:
        """Public fingerprint of the secret (to tell which secret made a cache, revealing nothing)."""
        return self.key("secret-fingerprint", "")[:12]
