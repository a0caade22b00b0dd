"""What ``neurovfm serve`` was started with, checked once: a server that would be reachable from
the network without a token refuses to start rather than serving scans to anyone who asks."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from neurovfm.errors import NeuroVFMError

MB = 1024 * 1024
TOKEN_ENV = "NEUROVFM_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # a guessable token on a network-facing server is no guard


class ServeConfigError(NeuroVFMError):
    """The server cannot start with these settings."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:  # any other host name may resolve to a public interface
        return False


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "neurovfm", "serve")


@dataclass
class ServeSettings:
    model: str | None = None  # model folder; None: the shipped demo model
    report: bool = False  # add a draft findings report per exam (report model below, or the shipped one)
    report_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    root: str | None = None  # study folders under here may be picked from the page
    workers: int = 1
    retention_hours: float = 24.0
    max_upload_bytes: int = 2048 * MB
    max_files: int = 5000
    data: str = ""  # outputs (de-identified volumes, results); default: default_data_dir()
    token: str | None = None

    def __post_init__(self) -> None:
        self.data = os.path.abspath(self.data or default_data_dir())
        if self.workers < 1:
            raise ServeConfigError("--workers must be >= 1")
        if self.retention_hours <= 0:
            raise ServeConfigError("--retention-hours must be > 0")
        if self.max_upload_bytes < 1 or self.max_files < 1:
            raise ServeConfigError("--max-upload-mb and --max-files must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"--port {self.port} is not a TCP port")
        if self.root is not None:
            if not os.path.isdir(self.root):
                raise ServeConfigError(f"--root {self.root}: not a folder")
            self.root = os.path.realpath(self.root)
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ServeConfigError(f"the token must have at least {MIN_TOKEN_CHARS} characters "
                                   "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        if not self.loopback and not self.token:
            raise ServeConfigError(f"refusing to serve on {self.host} (reachable from other machines) without a "
                                   f"token: pass --token or set {TOKEN_ENV}")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def token_required(self) -> bool:
        return bool(self.token)
