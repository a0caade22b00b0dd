"""Study folders picked on the server under the configured ``--root``: listed and resolved so that
no path (``..``, an absolute path, a symbolic link pointing out) ever leaves the root.

Folder names may hold patients' names, so the page sends them in request bodies, never in URLs,
and the server never logs them.
"""

from __future__ import annotations

import os

MAX_LISTED = 2000  # entries shown per folder


class RootError(Exception):
    """``status``: 400 malformed path, 403 outside the root, 404 missing."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def resolve(root: str | None, rel: str) -> str:
    """The real path of ``rel`` (relative to ``root``); refused unless it stays inside the root."""
    if not root:
        raise RootError(404, "this server was started without --root: no folders to pick")
    rel = rel or ""
    if not isinstance(rel, str) or "\x00" in rel:
        raise RootError(400, "bad path")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise RootError(400, "give a path relative to the server's root folder")
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    if path != root and not path.startswith(root + os.sep):
        raise RootError(403, "that path is outside the server's root folder")
    if not os.path.isdir(path):
        raise RootError(404, "no such folder under the root")
    return path


def listing(root: str | None, rel: str) -> dict:
    """Sub-folders (and a count of files) of one folder under the root."""
    path = resolve(root, rel)
    dirs, files = [], 0
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        inside = os.path.realpath(e.path)
                        if inside.startswith(os.path.realpath(root) + os.sep):  # links out are not shown
                            dirs.append(e.name)
                    elif e.is_file():
                        files += 1
                except OSError:
                    continue
    except OSError:
        raise RootError(403, "that folder cannot be read") from None
    dirs.sort()
    here = os.path.relpath(path, os.path.realpath(root))
    return {"path": "" if here == "." else here.replace(os.sep, "/"), "folders": dirs[:MAX_LISTED],
            "truncated": len(dirs) > MAX_LISTED, "files": files}
