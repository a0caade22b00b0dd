"""Shared fixtures. The phantom itself lives in :mod:`neurovfm.synth.phantom`."""

from __future__ import annotations

import pytest

from neurovfm.privacy.keys import Keyer
from neurovfm.synth.phantom import MARKER_LPS, MARKER_RADIUS, head_phantom_hu, write_phantom_series  # noqa: F401


@pytest.fixture
def keyer() -> Keyer:
    return Keyer(b"test-site-secret")


@pytest.fixture(autouse=True)
def _isolated_secret(tmp_path, monkeypatch):
    """Never touch the user's real site secret from a test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NEUROVFM_SITE_SECRET", raising=False)
