"""Label tables for the synthetic archive: names, triage acuity, implied parents, CT <-> MRI.

The tables are package data under ``neurovfm/synth/tables/``:

* ``ct_labels.txt`` / ``mri_labels.txt``: the label names, one a line (copies of the
  project's label lists, so nothing outside the package is read at run time);
* ``label_acuity.csv`` (``modality,label,acuity,parents``): the triage level of a study whose
  only finding is that label (``Urgent`` / ``Routine`` / ``Normal``) and the ``|``-separated
  labels of the same modality that must also be positive whenever it is;
* ``ct_mri_labels.csv`` (``ct_label,mri_label``): findings both modalities share.

Everything is validated on first use; any problem raises :class:`ValueError` naming the file
and, where there is one, the line. Modalities are ``"CT"`` and ``"MR"`` (``"MRI"`` and any
case are accepted).
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ACUITY_LEVELS",
    "MODALITIES",
    "acuity",
    "close_labels",
    "ct_to_mri",
    "label_names",
    "mri_to_ct",
    "normalize_modality",
    "parents",
    "triage",
    "validate_all",
]

#: Triage levels, most urgent first.
ACUITY_LEVELS: tuple[str, ...] = ("Urgent", "Routine", "Normal")
MODALITIES: tuple[str, ...] = ("CT", "MR")

_RANK = {level: i for i, level in enumerate(ACUITY_LEVELS)}  # lower = more urgent
_LABEL_FILES = {"CT": "ct_labels.txt", "MR": "mri_labels.txt"}
_ACUITY_FILE = "label_acuity.csv"
_MAPPING_FILE = "ct_mri_labels.csv"
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


def _table_dir() -> str:
    """The folder holding the tables (``tables/`` next to this module)."""
    try:
        path = os.fspath(importlib.resources.files(__package__ or "neurovfm.synth") / "tables")
    except (TypeError, ModuleNotFoundError):  # pragma: no cover - non-filesystem loaders
        path = ""
    if not path or not os.path.isdir(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")
    return path


def _path(name: str, directory: str | None = None) -> str:
    return os.path.join(directory or _table_dir(), name)


def normalize_modality(modality: str) -> str:
    """``"CT"`` or ``"MR"`` for any spelling of the two (``ct``, ``MRI``, ``mr``...)."""
    m = str(modality).strip().upper()
    if m == "CT":
        return "CT"
    if m in ("MR", "MRI"):
        return "MR"
    raise ValueError(f"unknown modality {modality!r}: expected 'CT' or 'MR'")


# --------------------------------------------------------------------------------------------
# loading and validation


@dataclass(frozen=True)
class _Tables:
    names: dict[str, tuple[str, ...]]  # modality -> labels in file order
    acuity: dict[tuple[str, str], str]  # (modality, label) -> level
    direct_parents: dict[tuple[str, str], tuple[str, ...]]
    ancestors: dict[tuple[str, str], tuple[str, ...]]  # transitive closure, nearest first
    ct_to_mri: dict[str, tuple[str, ...]]
    mri_to_ct: dict[str, tuple[str, ...]]


def _read_names(modality: str, directory: str | None) -> tuple[str, ...]:
    path = _path(_LABEL_FILES[modality], directory)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read label list: {exc}") from exc
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        name = raw.strip()
        if not name:
            continue
        if not _NAME_RE.match(name):
            raise ValueError(f"{path}:{lineno}: invalid label name {name!r}")
        if name in seen:
            raise ValueError(f"{path}:{lineno}: duplicate label {name!r} (first on line {seen[name]})")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no labels")
    return tuple(names)


def _open_csv(path: str, header: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with exactly ``header`` as its columns, with their line numbers."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            rows = []
            first = True
            for row in reader:
                lineno = reader.line_num
                if first:
                    first = False
                    got = [c.strip() for c in row]
                    if got != header:
                        raise ValueError(f"{path}:{lineno}: header {got} != expected {header}")
                    continue
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}"
                    )
                rows.append((lineno, {k: v.strip() for k, v in zip(header, row)}))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read table: {exc}") from exc
    if first:
        raise ValueError(f"{path}: empty table")
    return rows


def _read_acuity(names: dict[str, tuple[str, ...]], directory: str | None):
    path = _path(_ACUITY_FILE, directory)
    rows = _open_csv(path, ["modality", "label", "acuity", "parents"])
    known = {m: set(v) for m, v in names.items()}
    acu: dict[tuple[str, str], str] = {}
    direct: dict[tuple[str, str], tuple[str, ...]] = {}
    line_of: dict[tuple[str, str], int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        mod = row["modality"]
        if mod not in MODALITIES:
            raise ValueError(f"{where}: unknown modality {mod!r} (expected CT or MR)")
        label = row["label"]
        if label not in known[mod]:
            raise ValueError(f"{where}: unknown {mod} label {label!r}")
        key = (mod, label)
        if key in acu:
            raise ValueError(f"{where}: duplicate row for {mod} {label!r} (first on line {line_of[key]})")
        level = row["acuity"]
        if level not in _RANK:
            raise ValueError(f"{where}: bad acuity {level!r} for {label!r} (expected one of {', '.join(ACUITY_LEVELS)})")
        plist: list[str] = []
        if row["parents"]:
            for p in row["parents"].split("|"):
                p = p.strip()
                if not p:
                    raise ValueError(f"{where}: empty parent in {row['parents']!r}")
                if p not in known[mod]:
                    raise ValueError(f"{where}: unknown {mod} parent label {p!r} of {label!r}")
                if p == label:
                    raise ValueError(f"{where}: cycle: {label!r} lists itself as a parent")
                if p in plist:
                    raise ValueError(f"{where}: parent {p!r} listed twice for {label!r}")
                plist.append(p)
        acu[key] = level
        direct[key] = tuple(plist)
        line_of[key] = lineno

    for mod in MODALITIES:
        missing = [n for n in names[mod] if (mod, n) not in acu]
        if missing:
            raise ValueError(f"{path}: no row for {len(missing)} {mod} label(s): {', '.join(missing)}")

    # cycles: depth-first search with colours, reporting the line of a row on the cycle
    ancestors: dict[tuple[str, str], tuple[str, ...]] = {}
    for mod in MODALITIES:
        state: dict[str, int] = {}  # 1 = on stack, 2 = done

        def visit(label: str, stack: list[str]) -> None:
            state[label] = 1
            stack.append(label)
            for p in direct[(mod, label)]:
                s = state.get(p, 0)
                if s == 1:
                    cyc = stack[stack.index(p):] + [p]
                    raise ValueError(
                        f"{path}:{line_of[(mod, label)]}: cycle in {mod} parents: {' -> '.join(cyc)}"
                    )
                if s == 0:
                    visit(p, stack)
            stack.pop()
            state[label] = 2

        for label in names[mod]:
            if state.get(label, 0) == 0:
                visit(label, [])

        for label in names[mod]:
            order: list[str] = []
            frontier = list(direct[(mod, label)])
            while frontier:
                nxt: list[str] = []
                for p in frontier:
                    if p not in order:
                        order.append(p)
                        nxt.extend(direct[(mod, p)])
                frontier = nxt
            ancestors[(mod, label)] = tuple(order)

        # a label is never less urgent than a label it implies, so triage(labels) ==
        # triage(close_labels(labels))
        for label in names[mod]:
            for p in ancestors[(mod, label)]:
                if _RANK[acu[(mod, label)]] > _RANK[acu[(mod, p)]]:
                    raise ValueError(
                        f"{path}:{line_of[(mod, label)]}: {mod} {label!r} is {acu[(mod, label)]} "
                        f"but implies {p!r} which is {acu[(mod, p)]}"
                    )
    return acu, direct, ancestors


def _read_mapping(names: dict[str, tuple[str, ...]], directory: str | None):
    path = _path(_MAPPING_FILE, directory)
    rows = _open_csv(path, ["ct_label", "mri_label"])
    ct_known, mr_known = set(names["CT"]), set(names["MR"])
    c2m: dict[str, list[str]] = {}
    m2c: dict[str, list[str]] = {}
    seen: dict[tuple[str, str], int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        c, m = row["ct_label"], row["mri_label"]
        if c not in ct_known:
            raise ValueError(f"{where}: unknown CT label {c!r}")
        if m not in mr_known:
            raise ValueError(f"{where}: unknown MR label {m!r}")
        if (c, m) in seen:
            raise ValueError(f"{where}: duplicate pair {c},{m} (first on line {seen[(c, m)]})")
        seen[(c, m)] = lineno
        c2m.setdefault(c, []).append(m)
        m2c.setdefault(m, []).append(c)
    return {k: tuple(v) for k, v in c2m.items()}, {k: tuple(v) for k, v in m2c.items()}


def _load(directory: str | None = None) -> _Tables:
    names = {m: _read_names(m, directory) for m in MODALITIES}
    acu, direct, ancestors = _read_acuity(names, directory)
    c2m, m2c = _read_mapping(names, directory)
    return _Tables(names, acu, direct, ancestors, c2m, m2c)


@functools.lru_cache(maxsize=1)
def _tables() -> _Tables:
    return _load()


def validate_all(directory: str | None = None) -> None:
    """Load and validate every table now (they are otherwise loaded on first use).

    ``directory`` checks a folder holding the same four files instead of the packaged ones
    (for editing the tables); the packaged tables in use are not replaced by it.
    """
    if directory is None:
        _tables.cache_clear()
        _tables()
    else:
        _load(directory)


def _check(modality: str, label: str) -> tuple[str, str]:
    mod = normalize_modality(modality)
    t = _tables()
    if (mod, label) not in t.acuity:
        raise ValueError(f"unknown {mod} label {label!r}")
    return mod, label


# --------------------------------------------------------------------------------------------
# public look-ups


def label_names(modality: str) -> list[str]:
    """The labels of ``modality`` in file order."""
    return list(_tables().names[normalize_modality(modality)])


def acuity(modality: str, label: str) -> str:
    """``"Urgent"``, ``"Routine"`` or ``"Normal"``: the triage of a study with only ``label``."""
    return _tables().acuity[_check(modality, label)]


def parents(modality: str, label: str) -> list[str]:
    """Every label implied by ``label`` (transitive closure), nearest first; ``[]`` if none."""
    return list(_tables().ancestors[_check(modality, label)])


def close_labels(modality: str, labels: Iterable[str]) -> set[str]:
    """``labels`` plus all their ancestors."""
    mod = normalize_modality(modality)
    out: set[str] = set()
    for label in labels:
        _check(mod, label)
        out.add(label)
        out.update(_tables().ancestors[(mod, label)])
    return out


def ct_to_mri(label: str) -> list[str]:
    """MRI labels for the same finding as CT ``label`` (``[]`` where MRI has none)."""
    _check("CT", label)
    return list(_tables().ct_to_mri.get(label, ()))


def mri_to_ct(label: str) -> list[str]:
    """CT labels for the same finding as MRI ``label`` (``[]`` where CT has none)."""
    _check("MR", label)
    return list(_tables().mri_to_ct.get(label, ()))


def triage(modality: str, labels: Iterable[str]) -> str:
    """``Urgent`` if any label is urgent, else ``Routine`` if any is routine, else ``Normal``.

    No labels at all is ``Normal``. Because a label is never less urgent than the labels it
    implies, the result is the same with or without :func:`close_labels`.
    """
    mod = normalize_modality(modality)
    best = _RANK["Normal"]
    for label in labels:
        best = min(best, _RANK[acuity(mod, label)])
    return ACUITY_LEVELS[best]
