"""``neurovfm ingest``: walk a source tree, make volumes, tokenize, write the cache.

Discovery reads headers only; series are grouped and split; each unit (a DICOM series or a
NIfTI file) is processed in a worker; the parent writes shards and index rows. Per-file and
per-series problems become manifest rows and the run goes on; only fatal problems (bad
arguments, an unwritable cache) raise. Nothing identifying leaves this module: ids are keyed
hashes and the metadata written is the allowlist in :mod:`neurovfm.privacy.allowlist`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from tqdm import tqdm

from neurovfm.errors import IngestError, NeuroVFMError
from neurovfm.files import file_sha256
from neurovfm.ingest.classify import classify, skip_reason
from neurovfm.ingest.dicom_headers import SliceRecord, read_header
from neurovfm.ingest.dicom_series import SeriesCandidate, build_stack, group_records
from neurovfm.ingest.geometry import RememberedPlanes, canonicalize
from neurovfm.ingest.nifti import bids_entities, classify_nifti, is_nifti, open_nifti, read_sidecar
from neurovfm.ingest.policy import DEFAULT_POLICY, PreprocessPolicy
from neurovfm.privacy.allowlist import series_metadata
from neurovfm.privacy.keys import Keyer
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.patches import TokenizedSeries, tokenize

IGNORED_SUFFIXES = (".json", ".bval", ".bvec", ".txt", ".md", ".csv", ".tsv", ".part", ".tmp")


@dataclass
class IngestOptions:
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    modality: str | None = None  # "ct" / "mr": for NIfTI without a sidecar
    strict: bool = False
    policy: PreprocessPolicy = DEFAULT_POLICY
    progress: bool = True
    series_per_shard: int = 64  # a shard is committed after this many series (or 256 MiB)

    def __post_init__(self) -> None:
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard must be i/N with 0 <= i < N, got {i}/{n}")
        if self.series_per_shard < 1:
            raise ValueError("--series-per-shard must be >= 1")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.modality is not None and self.modality.lower() not in ("ct", "mr", "mri"):
            raise ValueError(f"--modality must be ct or mr, got {self.modality!r}")


@dataclass
class IngestSummary:
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    cached: int = 0  # already in the cache from an earlier run
    tokens: int = 0
    reasons: Counter = field(default_factory=Counter)
    # (path relative to the source, status, code, reason): shown on request, never written to the cache
    refused_files: list[tuple[str, str, str, str]] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"{'ingested':>10}  {self.ingested} series ({self.tokens} tokens)",
            f"{'in cache':>10}  {self.cached} series (from earlier runs)",
            f"{'skipped':>10}  {self.skipped}",
            f"{'failed':>10}  {self.failed}",
        ]
        if self.reasons:
            lines.append("top reasons:")
            for (status, code), n in self.reasons.most_common(8):
                lines.append(f"  {n:6d}  {status:7s}  {code}")
        return "\n".join(lines)


@dataclass
class Unit:
    """One piece of work: a DICOM series candidate or a NIfTI file."""

    kind: str  # "dicom" | "nifti"
    study_identity: str  # raw, hashed before storage
    candidate: SeriesCandidate | None = None
    path: str | None = None
    relpath: str | None = None
    source_fp: str = ""


def iter_files(src: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            yield os.path.join(dirpath, f)


def _read_headers_chunk(paths: list[str]) -> tuple[list[SliceRecord], list[IngestError]]:
    recs: list[SliceRecord] = []
    errs: list[IngestError] = []
    for p in paths:
        try:
            recs.extend(read_header(p))
        except IngestError as e:
            errs.append(e)
        except Exception as e:  # a parser bug must not stop the run; it is reported per file
            errs.append(IngestError("unreadable", f"unexpected error reading header ({type(e).__name__})", p))
    return recs, errs


def discover(src: str, pool: ProcessPoolExecutor | None = None, progress: bool = True
             ) -> tuple[list[Unit], list[IngestError]]:
    """Header-only discovery: units of work and file-level refusals."""
    src = os.path.abspath(src)
    dicom_paths: list[str] = []
    units: list[Unit] = []
    for p in iter_files(src):
        low = p.lower()
        if is_nifti(p):
            rel = os.path.relpath(p, src)
            ents, _ = bids_entities(p)
            if "sub" in ents:
                study = f"sub-{ents['sub']}/ses-{ents.get('ses', '')}"
            else:
                study = os.path.dirname(rel) or rel
            units.append(Unit("nifti", study, path=p, relpath=rel))
        elif low.endswith(IGNORED_SUFFIXES):
            continue
        else:
            dicom_paths.append(p)
    records: list[SliceRecord] = []
    errors: list[IngestError] = []
    chunks = [dicom_paths[i:i + 256] for i in range(0, len(dicom_paths), 256)]
    bar = tqdm(total=len(dicom_paths), desc="headers", unit="file", disable=not progress, file=sys.stderr)
    results = pool.map(_read_headers_chunk, chunks) if pool is not None and len(chunks) > 1 else map(_read_headers_chunk, chunks)
    for (recs, errs), chunk in zip(results, chunks):
        records.extend(recs)
        errors.extend(errs)
        bar.update(len(chunk))
    bar.close()
    for cand in group_records(records):
        units.append(Unit("dicom", cand.first.study_uid, candidate=cand, source_fp=cand.source_fingerprint()))
    return units, errors


def _patient_of(unit: Unit, sidecar: dict | None = None) -> str:
    if unit.kind == "dicom":
        assert unit.candidate is not None
        return unit.candidate.first.attrs.get("_patient_id") or unit.study_identity
    if sidecar and sidecar.get("PatientID"):
        return str(sidecar["PatientID"])
    ents, _ = bids_entities(unit.path or "")
    if "sub" in ents:
        return f"sub-{ents['sub']}"
    return unit.study_identity


@dataclass
class UnitResult:
    rows: list[tuple[dict[str, Any], TokenizedSeries]]
    refusals: list[dict[str, Any]]
    where: str = ""  # the unit's folder or file, for the user's terminal only
    # with ``keep_sources``: the plane source of each row (native geometry and pixels), for
    # ``analyze``, which maps results back onto the original series; never sent to the cache
    sources: list[Any] = field(default_factory=list)


def process_unit(unit: Unit, policy: PreprocessPolicy, modality_hint: str | None, secret: bytes,
                 keep_sources: bool = False) -> UnitResult:
    """Build, canonicalise and tokenize one unit (runs in a worker process)."""
    keyer = Keyer(secret)
    rows: list[tuple[dict[str, Any], TokenizedSeries]] = []
    refusals: list[dict[str, Any]] = []
    sources: list[Any] = []
    study_key = keyer.study(unit.study_identity)
    if unit.kind == "dicom":
        cand = unit.candidate
        assert cand is not None
        first = cand.first
        series_key = keyer.series(cand.identity)
        patient_key = keyer.patient(_patient_of(unit))
        base = dict(series_key=series_key, study_key=study_key, patient_key=patient_key)
        try:
            skip = skip_reason(first.image_type, first.burned_in, first.attrs.get("_description", ""))
            if skip:
                raise IngestError(skip[0], skip[1], cand.display_path, status="skipped")
            cls = classify(first.modality, first.attrs, first.image_type, first.b_value, first.echo_time)
            if cls.perfusion:
                raise IngestError("perfusion", "CT perfusion (4-D) series are not volumes for this model", cand.display_path, status="skipped")
            stack = build_stack(cand, policy)
            if keep_sources:
                stack = RememberedPlanes(stack)
            cv = canonicalize(stack, policy, name=cand.display_path)
            ts = tokenize(cv, cls.modality, policy)
            if ts.n_tokens == 0:
                raise IngestError("no_foreground", "no foreground token (empty or all-background volume)", cand.display_path)
            meta = series_metadata(first.attrs, cls, cv, first, source_format="dicom")
            meta.update(base, source_key=keyer.source(unit.source_fp))
            rows.append((meta, ts))
            if keep_sources:
                sources.append(stack)
        except IngestError as e:
            refusals.append(dict(base, entry_key=series_key, kind="series", modality=first.modality,
                                 status=e.status, code=e.code, reason=e.reason))
        except MemoryError:
            refusals.append(dict(base, entry_key=series_key, kind="series", modality=first.modality,
                                 status="failed", code="memory", reason="out of memory building this series"))
        return UnitResult(rows, refusals, cand.display_path, sources)

    # NIfTI
    path = unit.path or ""
    fkey = keyer.key("file", unit.relpath or path)
    try:
        sidecar = read_sidecar(path)
        patient_key = keyer.patient(_patient_of(unit, sidecar))
        cls = classify_nifti(path, sidecar, modality_hint)
        stacks = open_nifti(path, policy)
        fp = unit.source_fp or file_sha256(path)
        for v, stack in enumerate(stacks):
            series_key = keyer.series(f"nifti\0{unit.relpath}\0{v}")
            base = dict(series_key=series_key, study_key=study_key, patient_key=patient_key)
            try:
                cv = canonicalize(stack, policy, name=path)
                if cls.modality == "CT" and float(cv.data.min()) > -200:
                    raise IngestError("not_hu", "CT values do not look like Hounsfield units (no air below -200)", path)
                ts = tokenize(cv, cls.modality, policy)
                if ts.n_tokens == 0:
                    raise IngestError("no_foreground", "no foreground token (empty or all-background volume)", path)
                attrs = {
                    "repetition_time_ms": _ms(sidecar.get("RepetitionTime")),
                    "inversion_time_ms": _ms(sidecar.get("InversionTime")),
                    "flip_angle_deg": _num(sidecar.get("FlipAngle")),
                    "field_strength_t": _num(sidecar.get("MagneticFieldStrength")),
                    "manufacturer": str(sidecar.get("Manufacturer", ""))[:64],
                    "model": str(sidecar.get("ManufacturersModelName", ""))[:64],
                    "sex": str(sidecar.get("PatientSex", "U"))[:1].upper() or "U",
                    "age_years": _age(sidecar.get("PatientAge")),
                    "body_part": str(sidecar.get("BodyPartExamined", "")).upper()[:16],
                }
                meta = series_metadata(attrs, cls, cv, None, source_format="nifti",
                                       echo_time_ms=_ms(sidecar.get("EchoTime")),
                                       slice_thickness=_num(sidecar.get("SliceThickness")))
                meta.update(base, source_key=keyer.source(f"{fp}#{v}"))
                rows.append((meta, ts))
                if keep_sources:
                    sources.append(stack)
            except IngestError as e:
                refusals.append(dict(base, entry_key=series_key, kind="series", modality=cls.modality,
                                     status=e.status, code=e.code, reason=e.reason))
    except IngestError as e:
        refusals.append(dict(entry_key=fkey, kind="file", study_key=study_key, status=e.status,
                             code=e.code, reason=e.reason))
    return UnitResult(rows, refusals, path, sources)


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _ms(v: Any) -> float | None:
    f = _num(v)
    return None if f is None else f * 1000.0


def _age(v: Any) -> int | None:
    f = _num(v)
    return None if f is None else int(min(max(f, 0), 90))


def _process_star(args: tuple) -> UnitResult:
    unit, policy, hint, secret = args
    try:
        return process_unit(unit, policy, hint, secret)
    except Exception as e:  # never lose the run to one series; report it
        keyer = Keyer(secret)
        key = keyer.series(unit.candidate.identity) if unit.candidate else keyer.key("file", unit.relpath or "")
        return UnitResult([], [dict(entry_key=key, kind="series" if unit.candidate else "file",
                                    status="failed", code="internal_error",
                                    reason=f"unexpected {type(e).__name__}: {str(e)[:120]}")])


def _in_shard(unit: Unit, keyer: Keyer, shard: tuple[int, int]) -> bool:
    i, n = shard
    if n == 1:
        return True
    return int(keyer.study(unit.study_identity)[:8], 16) % n == i


def run_ingest(src: str, cache_dir: str, options: IngestOptions | None = None,
               keyer: Keyer | None = None, log=print) -> IngestSummary:
    """Ingest ``src`` into ``cache_dir``. Raises only on fatal errors (see module doc)."""
    opts = options or IngestOptions()
    if not os.path.isdir(src):
        raise NeuroVFMError(f"{src}: source folder does not exist")
    keyer = keyer or Keyer.from_site()
    cache = TokenCache(cache_dir, policy=opts.policy, create=True, secret_fingerprint=keyer.fingerprint())
    summary = IngestSummary()
    pool = ProcessPoolExecutor(max_workers=opts.workers) if opts.workers > 1 else None
    try:
        units, file_errors = discover(src, pool, opts.progress)
        units = [u for u in units if _in_shard(u, keyer, opts.shard)]
        todo: list[Unit] = []
        for u in units:
            if u.kind == "nifti" and u.path:
                u.source_fp = file_sha256(u.path)
                if cache.has_source(keyer.source(f"{u.source_fp}#0")):
                    summary.cached += 1
                    continue
            elif cache.has_source(keyer.source(u.source_fp)):
                summary.cached += 1
                continue
            todo.append(u)
        with cache.writer(max_series=opts.series_per_shard) as writer:
            src_abs = os.path.abspath(src)
            for e in file_errors:
                rel = os.path.relpath(e.path or "", src_abs)
                if opts.shard[1] > 1 and int(keyer.key("file", rel)[:8], 16) % opts.shard[1] != opts.shard[0]:
                    continue
                writer.add_manifest(dict(entry_key=keyer.key("file", rel), kind="file", status=e.status,
                                         code=e.code, reason=e.reason))
                _count(summary, e.status, e.code)
                summary.refused_files.append((rel, e.status, e.code, e.reason))
            args = [(u, opts.policy, opts.modality, keyer.secret) for u in todo]
            bar = tqdm(total=len(args), desc="series", unit="series", disable=not opts.progress, file=sys.stderr)
            results = pool.map(_process_star, args, chunksize=1) if pool is not None else map(_process_star, args)
            for res in results:
                for meta, ts in res.rows:
                    writer.add(meta, ts)
                    summary.ingested += 1
                    summary.tokens += ts.n_tokens
                for r in res.refusals:
                    writer.add_manifest(r)
                    _count(summary, r["status"], r["code"])
                    if res.where:
                        summary.refused_files.append((os.path.relpath(res.where, src_abs), r["status"], r["code"], r["reason"]))
                bar.update(1)
            bar.close()
        cache.export_manifest()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        cache.close()
    return summary


def _count(summary: IngestSummary, status: str, code: str) -> None:
    if status == "skipped":
        summary.skipped += 1
    else:
        summary.failed += 1
    summary.reasons[(status, code)] += 1
