"""The token cache: sharded binary files read by memory mapping, one SQLite index.

Layout of a cache folder::

    index.sqlite      meta (schema + preprocessing hashes), series (allowlisted metadata and
                      where each series' bytes are), manifest (one row per series or refused file)
    manifest.csv      the manifest table, rewritten atomically at the end of each ingest run
    shards/*.bin      concatenated token blocks (n x V x 1024) and coordinate blocks (n x 3 int16),
                      64-byte aligned; no pickle anywhere

Writes are atomic: a shard is written under a temporary name, fsynced, renamed, and only then
are its index rows committed in one transaction. A run killed at any point leaves either a
temporary file (removed by the next writer if its process is gone) or an unreferenced shard,
never an index row pointing at missing bytes. A rerun skips series whose source fingerprint is
already indexed, so ingestion is appendable and resumable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from neurovfm import __version__
from neurovfm.errors import CacheError, SchemaMismatchError
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.tokens.patches import TokenizedSeries
from neurovfm.tokens.windows import fixed_to_window

SCHEMA_VERSION = 1
ALIGN = 64

SERIES_COLUMNS: dict[str, str] = {
    "series_key": "TEXT PRIMARY KEY",
    "study_key": "TEXT NOT NULL",
    "patient_key": "TEXT NOT NULL",
    "source_key": "TEXT NOT NULL",
    "source_format": "TEXT",
    "modality": "TEXT NOT NULL",
    "sequence": "TEXT",
    "kernel": "TEXT",
    "contrast": "INTEGER",
    "cta": "INTEGER",
    "perfusion": "INTEGER",
    "plane": "TEXT",
    "tilt_corrected": "INTEGER",
    "oblique_deg": "REAL",
    "source_shape": "TEXT",
    "source_spacing": "TEXT",
    "shape": "TEXT",
    "grid_shape": "TEXT",
    "grid_affine": "TEXT",
    "n_tokens": "INTEGER NOT NULL",
    "storage": "TEXT NOT NULL",
    "views": "TEXT NOT NULL",
    "shard": "TEXT NOT NULL",
    "tokens_offset": "INTEGER NOT NULL",
    "coords_offset": "INTEGER NOT NULL",
    "slice_thickness_mm": "REAL",
    "repetition_time_ms": "REAL",
    "echo_time_ms": "REAL",
    "inversion_time_ms": "REAL",
    "flip_angle_deg": "REAL",
    "field_strength_t": "REAL",
    "kvp": "REAL",
    "b_value": "REAL",
    "manufacturer": "TEXT",
    "model": "TEXT",
    "sex": "TEXT",
    "age_years": "INTEGER",
    "body_part": "TEXT",
    "code_version": "TEXT",
}

MANIFEST_COLUMNS: dict[str, str] = {
    "entry_key": "TEXT PRIMARY KEY",
    "kind": "TEXT NOT NULL",  # series | file
    "series_key": "TEXT",
    "study_key": "TEXT",
    "patient_key": "TEXT",
    "modality": "TEXT",
    "sequence": "TEXT",
    "kernel": "TEXT",
    "status": "TEXT NOT NULL",  # ok | skipped | failed
    "code": "TEXT",
    "reason": "TEXT",
    "n_tokens": "INTEGER",
}


def _ddl() -> str:
    s = ", ".join(f"{k} {v}" for k, v in SERIES_COLUMNS.items())
    m = ", ".join(f"{k} {v}" for k, v in MANIFEST_COLUMNS.items())
    return (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"CREATE TABLE IF NOT EXISTS series ({s});"
        f"CREATE TABLE IF NOT EXISTS manifest ({m});"
        "CREATE INDEX IF NOT EXISTS series_source ON series(source_key);"
        "CREATE INDEX IF NOT EXISTS series_study ON series(study_key);"
    )


def schema_hash() -> str:
    return hashlib.sha256(f"{SCHEMA_VERSION}\n{_ddl()}".encode()).hexdigest()[:16]


@dataclass
class SeriesEntry:
    """One indexed series: allowlisted metadata plus where its bytes are."""

    row: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def views_tuple(self) -> tuple[str, ...]:
        return tuple(json.loads(self.row["views"]))

    @property
    def grid_affine_array(self) -> np.ndarray:
        return np.array(json.loads(self.row["grid_affine"]), float).reshape(4, 4)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def as_views(toks: np.ndarray, storage: str, stored: tuple[str, ...], policy: PreprocessPolicy,
             names: Iterable[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Stored tokens -> uint8 views [n, V, T]: CT windows are made on the fly from fixed-point HU
    (``hu16``), stored uint8 views are selected by name. Shared by the cache and ``analyze``."""
    if storage == "hu16":
        wins = {w.name: w for w in policy.ct_windows}
        names = tuple(names) if names is not None else tuple(wins)
        out = np.empty((toks.shape[0], len(names), toks.shape[2]), np.uint8)
        for i, nm in enumerate(names):
            out[:, i] = fixed_to_window(toks[:, 0], wins[nm], policy.hu16_scale)
        return out, names
    names = tuple(names) if names is not None else tuple(stored)
    idx = [stored.index(nm) for nm in names]
    return np.asarray(toks[:, idx]), names


class TokenCache:
    """Open (or create) a token cache and check that its schema and policy match."""

    def __init__(self, root: str, policy: PreprocessPolicy | None = None, create: bool = False,
                 secret_fingerprint: str | None = None):
        self.root = os.path.abspath(root)
        self.index_path = os.path.join(self.root, "index.sqlite")
        self.shard_dir = os.path.join(self.root, "shards")
        exists = os.path.exists(self.index_path)
        if not exists and not create:
            raise CacheError(f"{self.root}: not a token cache (no index.sqlite)")
        try:
            os.makedirs(self.shard_dir, exist_ok=True)
            probe = os.path.join(self.root, f".write-probe-{os.getpid()}")
            if create:
                with open(probe, "w") as fh:
                    fh.write("ok")
                os.unlink(probe)
        except OSError as exc:
            raise CacheError(f"{self.root}: cache folder is not writable ({exc.strerror})") from None
        try:
            self.db = sqlite3.connect(self.index_path, timeout=60.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise CacheError(f"{self.index_path}: index cannot be opened ({exc})") from None
        self.db.row_factory = sqlite3.Row
        meta = self._meta() if exists else {}
        if not meta:
            if policy is None:
                raise CacheError(f"{self.root}: empty cache and no preprocessing policy to create it with")
            self.db.executescript(_ddl())
            self._set_meta({
                "schema_version": str(SCHEMA_VERSION),
                "schema_hash": schema_hash(),
                "policy": json.dumps(policy.to_dict(), sort_keys=True, default=str),
                "policy_hash": policy.hash(),
                "secret_fingerprint": secret_fingerprint or "",
                "created_with": f"neurovfm {__version__}",
            })
            meta = self._meta()
        if meta.get("schema_hash") != schema_hash():
            raise SchemaMismatchError(
                f"{self.root}: cache schema {meta.get('schema_hash')} (v{meta.get('schema_version')}) "
                f"does not match this code's {schema_hash()} (v{SCHEMA_VERSION})")
        self.policy = PreprocessPolicy.from_dict(json.loads(meta["policy"]))
        if self.policy.hash() != meta.get("policy_hash"):
            raise SchemaMismatchError(f"{self.root}: stored policy does not match its recorded hash")
        if policy is not None and policy.hash() != self.policy.hash():
            raise SchemaMismatchError(
                f"{self.root}: cache was built with preprocessing {self.policy.hash()}, "
                f"this run asks for {policy.hash()}; use a new cache folder")
        fp = meta.get("secret_fingerprint", "")
        if secret_fingerprint and fp and fp != secret_fingerprint:
            raise SchemaMismatchError(
                f"{self.root}: cache was keyed with another site secret (fingerprint {fp}); "
                "its ids would not join with this run's")
        self.meta = meta
        self._maps: dict[str, np.memmap] = {}

    # -- meta -------------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        try:
            rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError:
            return {}
        return {r["key"]: r["value"] for r in rows}

    def _set_meta(self, kv: dict[str, str]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(kv.items()))

    def transaction(self) -> "_Tx":
        return _Tx(self.db)

    @property
    def policy_hash(self) -> str:
        return self.meta["policy_hash"]

    def check(self, schema: str | None = None, policy_hash: str | None = None) -> None:
        """Readers call this with the hashes they were built for."""
        if schema is not None and schema != self.meta["schema_hash"]:
            raise SchemaMismatchError(f"{self.root}: schema {self.meta['schema_hash']} != expected {schema}")
        if policy_hash is not None and policy_hash != self.policy_hash:
            raise SchemaMismatchError(f"{self.root}: preprocessing {self.policy_hash} != expected {policy_hash}")

    # -- queries ----------------------------------------------------------------------------
    def has_source(self, source_key: str) -> bool:
        r = self.db.execute("SELECT 1 FROM series WHERE source_key = ? LIMIT 1", (source_key,)).fetchone()
        return r is not None

    def series(self, **where: Any) -> list[SeriesEntry]:
        sql = "SELECT * FROM series"
        args: list[Any] = []
        if where:
            for k in where:
                if k not in SERIES_COLUMNS:
                    raise KeyError(f"unknown series column {k!r}")
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
            args = list(where.values())
        sql += " ORDER BY study_key, series_key"
        return [SeriesEntry(dict(r)) for r in self.db.execute(sql, args).fetchall()]

    def get(self, series_key: str) -> SeriesEntry:
        r = self.db.execute("SELECT * FROM series WHERE series_key = ?", (series_key,)).fetchone()
        if r is None:
            raise KeyError(series_key)
        return SeriesEntry(dict(r))

    def manifest(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM manifest ORDER BY kind DESC, entry_key").fetchall()]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM series").fetchone()[0])

    # -- reading tokens ---------------------------------------------------------------------
    def _map(self, shard: str) -> np.memmap:
        mm = self._maps.get(shard)
        if mm is None:
            path = os.path.join(self.shard_dir, shard)
            if not os.path.exists(path):
                raise CacheError(f"{path}: shard referenced by the index is missing")
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps[shard] = mm
        return mm

    def raw(self, entry: SeriesEntry | str) -> tuple[np.ndarray, np.ndarray]:
        """Stored tokens [n, V, T] (uint8 or int16) and coords [n, 3] int16, memory-mapped."""
        e = self.get(entry) if isinstance(entry, str) else entry
        mm = self._map(e.shard)
        n = int(e.n_tokens)
        views = len(e.views_tuple)
        tdim = self.policy.token_dim
        dtype = np.int16 if e.storage == "hu16" else np.uint8
        nbytes = n * views * tdim * np.dtype(dtype).itemsize
        off = int(e.tokens_offset)
        toks = mm[off:off + nbytes].view(dtype).reshape(n, views, tdim)
        coff = int(e.coords_offset)
        coords = mm[coff:coff + n * 6].view(np.int16).reshape(n, 3)
        return toks, coords

    def views(self, entry: SeriesEntry | str, names: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """uint8 views [n, V, T] (CT windows made on the fly from fixed-point HU), coords, names."""
        e = self.get(entry) if isinstance(entry, str) else entry
        toks, coords = self.raw(e)
        out, names = as_views(toks, e.storage, e.views_tuple, self.policy, names)
        return out, coords, names

    def writer(self, max_bytes: int = 256 * 1024**2, max_series: int = 64) -> "ShardWriter":
        return ShardWriter(self, max_bytes=max_bytes, max_series=max_series)

    # -- manifest / maintenance ---------------------------------------------------------------
    def export_manifest(self) -> str:
        path = os.path.join(self.root, "manifest.csv")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        for row in self.manifest():
            w.writerow(row)
        atomic_write_text(path, buf.getvalue())
        return path

    def remove_stale_temporaries(self) -> int:
        """Delete temporary shards left by writers on this host whose process is gone."""
        host = socket.gethostname().replace("-", "_")
        removed = 0
        for name in os.listdir(self.shard_dir):
            if not name.startswith(".tmp-"):
                continue
            parts = name.split("-")
            try:
                t_host, t_pid = parts[1], int(parts[2])
            except (IndexError, ValueError):
                continue
            if t_host != host:
                continue
            try:
                os.kill(t_pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                os.unlink(os.path.join(self.shard_dir, name))
                removed += 1
        return removed

    def close(self) -> None:
        self._maps.clear()
        self.db.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


class ShardWriter:
    """Appends series to a temporary shard; :meth:`flush` makes them visible atomically."""

    def __init__(self, cache: TokenCache, max_bytes: int, max_series: int):
        self.cache = cache
        self.max_bytes = max_bytes
        self.max_series = max_series
        self._fh: io.BufferedWriter | None = None
        self._tmp = ""
        self._name = ""
        self._rows: list[dict[str, Any]] = []
        self._manifest: list[dict[str, Any]] = []
        self._pos = 0
        cache.remove_stale_temporaries()

    def _open(self) -> None:
        self._name = f"{uuid.uuid4().hex}.bin"
        host = socket.gethostname().replace("-", "_")
        self._tmp = os.path.join(self.cache.shard_dir, f".tmp-{host}-{os.getpid()}-{self._name}")
        self._fh = open(self._tmp, "wb")
        self._pos = 0

    def _write_block(self, arr: np.ndarray) -> int:
        assert self._fh is not None
        pad = (-self._pos) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._pos += pad
        off = self._pos
        data = np.ascontiguousarray(arr).tobytes()
        self._fh.write(data)
        self._pos += len(data)
        return off

    def add(self, row: dict[str, Any], ts: TokenizedSeries) -> None:
        if self._fh is None:
            self._open()
        tok_off = self._write_block(ts.tokens)
        crd_off = self._write_block(ts.coords.astype(np.int16))
        row = dict(row)
        row.update(shard=self._name, tokens_offset=tok_off, coords_offset=crd_off, n_tokens=ts.n_tokens,
                   storage=ts.storage, views=json.dumps(list(ts.views)),
                   grid_shape=json.dumps(list(ts.grid_shape)), shape=json.dumps(list(ts.volume_shape)),
                   grid_affine=json.dumps([round(float(v), 6) for v in ts.grid_affine.ravel()]),
                   code_version=__version__)
        unknown = set(row) - set(SERIES_COLUMNS)
        if unknown:
            raise ValueError(f"columns not in the allowlisted schema: {sorted(unknown)}")
        self._rows.append(row)
        self._manifest.append(dict(entry_key=row["series_key"], kind="series", series_key=row["series_key"],
                                   study_key=row["study_key"], patient_key=row["patient_key"],
                                   modality=row["modality"], sequence=row.get("sequence"), kernel=row.get("kernel"),
                                   status="ok", code="", reason="", n_tokens=ts.n_tokens))
        if self._pos >= self.max_bytes or len(self._rows) >= self.max_series:
            self.flush()

    def add_manifest(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(MANIFEST_COLUMNS)
        if unknown:
            raise ValueError(f"manifest columns not in the schema: {sorted(unknown)}")
        self._manifest.append(row)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, os.path.join(self.cache.shard_dir, self._name))
            _fsync_dir(self.cache.shard_dir)
        if not self._rows and not self._manifest:
            return
        cols = list(SERIES_COLUMNS)
        mcols = list(MANIFEST_COLUMNS)
        with self.cache.transaction() as db:
            if self._rows:
                db.executemany(
                    f"INSERT OR REPLACE INTO series ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [[r.get(c) for c in cols] for r in self._rows])
            if self._manifest:
                db.executemany(
                    f"INSERT OR REPLACE INTO manifest ({', '.join(mcols)}) VALUES ({', '.join('?' * len(mcols))})",
                    [[r.get(c) for c in mcols] for r in self._manifest])
        self._rows.clear()
        self._manifest.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        elif self._fh is not None:  # an error: drop the unfinished shard, keep what was committed
            self._fh.close()
            self._fh = None
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
