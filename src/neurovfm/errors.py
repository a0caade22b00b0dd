"""Typed errors: every refusal names the file (or series) and the reason.

Callers (the ingest pipeline, the CLI) catch these and turn them into manifest rows or a
one-line message; anything else escaping is a bug, not a user error.
"""

from __future__ import annotations


class NeuroVFMError(Exception):
    """Base class of every error this package raises on purpose."""


class IngestError(NeuroVFMError):
    """A file or series cannot become a canonical volume.

    ``code`` is a short stable identifier (e.g. ``missing_slices``) used for counting
    reasons; ``reason`` is the human sentence; ``path`` names the offending file or folder.
    ``status`` is ``"failed"`` for broken input and ``"skipped"`` for input that is valid but
    out of scope by policy (localizers, secondary captures, non-image objects).
    """

    def __init__(self, code: str, reason: str, path: str | None = None, status: str = "failed"):
        self.code = code
        self.reason = reason
        self.path = path
        self.status = status
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{reason} [{code}]")

    def __reduce__(self):
        # ingest workers return these to the parent process; the default pickling would call
        # ``cls(message)``, which this signature refuses, and the whole pool would break on one bad file
        return _restore_ingest_error, (type(self), dict(self.__dict__))


def _restore_ingest_error(cls: type, state: dict) -> IngestError:
    err = IngestError.__new__(cls)
    IngestError.__init__(err, state["code"], state["reason"], state.get("path"), state.get("status", "failed"))
    err.__dict__.update(state)
    return err


class SkipSeries(IngestError):
    """Valid input that policy excludes (kept apart so it is not counted as a failure)."""

    def __init__(self, code: str, reason: str, path: str | None = None):
        super().__init__(code, reason, path, status="skipped")


class CacheError(NeuroVFMError):
    """The token cache cannot be opened or written (wrong schema, unwritable folder...)."""


class SchemaMismatchError(CacheError):
    """A reader expected another schema or preprocessing-parameter hash than the cache has."""


class PHIFoundError(NeuroVFMError):
    """``audit-phi`` found an identifying value from the source headers inside a cache."""
