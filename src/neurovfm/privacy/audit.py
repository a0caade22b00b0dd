"""``neurovfm audit-phi``: look for identifying values from the source headers in a cache.

Needles are gathered from every DICOM header under the source (patient name and its
components, ids, birth and study dates, accession numbers, institution and physician names,
descriptions, every UID) and from NIfTI sidecars and headers. Every file of the cache is then
searched byte for byte. In binary token shards only needles of 8 or more bytes are searched:
pixel bytes match a short string by chance (a 4-digit id is expected in any few hundred MB of
random bytes), while an 8-byte match happens by chance about once in 10^19 positions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import pydicom

from neurovfm.ingest.nifti import is_nifti, sidecar_path

PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "IssuerOfPatientID",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "PhysiciansOfRecord", "StationName", "DeviceSerialNumber",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyDescription", "SeriesDescription",
    "ProtocolName", "PatientComments", "AdditionalPatientHistory", "ImageComments", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
)
SIDECAR_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "SeriesDescription", "ProtocolName", "StudyInstanceUID", "SeriesInstanceUID",
                "AcquisitionDateTime", "StudyDescription", "ReferringPhysicianName", "DeviceSerialNumber")
MIN_TEXT = 5
MIN_BINARY = 8
BINARY_SUFFIXES = (".bin",)


@dataclass
class AuditReport:
    needles: int = 0
    files_scanned: int = 0
    bytes_scanned: int = 0
    hits: list[tuple[str, str, int]] = field(default_factory=list)  # (cache file, needle kind, offset)

    @property
    def clean(self) -> bool:
        return not self.hits


# values the cache stores on purpose (its own vocabulary): never identifying by themselves
VOCABULARY = {"axial", "coronal", "sagittal", "oblique", "flair", "other", "dicom", "nifti", "brain", "blood",
              "bone", "soft", "head"}
NAME_FIELDS = ("PN:", "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
               "RequestingPhysician", "PhysiciansOfRecord", "sidecar:PatientName")


def _add(needles: dict[bytes, str], value, kind: str) -> None:
    """Add a value; person names also by component (family, given), other fields whole."""
    if value is None:
        return
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        for v in value:
            _add(needles, v, kind)
        return
    s = str(value).strip()
    parts = {s}
    if kind.startswith(NAME_FIELDS):
        parts |= set(re.split(r"[\^= ,]+", s))
    for part in parts:
        part = part.strip()
        if len(part) >= MIN_TEXT and part.lower() not in VOCABULARY:
            needles[part.encode("utf-8")] = kind


def collect_needles(src: str) -> dict[bytes, str]:
    """Identifying values (bytes -> which field) from every header under ``src``."""
    needles: dict[bytes, str] = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            p = os.path.join(dirpath, f)
            if is_nifti(p):
                try:
                    import nibabel as nib
                    hdr = nib.load(p).header
                    for k in ("descrip", "db_name", "aux_file", "intent_name"):
                        if k in hdr:
                            v = hdr[k].item()
                            _add(needles, v.decode(errors="ignore") if isinstance(v, bytes) else v, f"nifti:{k}")
                except Exception:
                    pass
                sc = sidecar_path(p)
                if os.path.exists(sc):
                    try:
                        with open(sc, encoding="utf-8") as fh:
                            data = json.load(fh)
                        for k in SIDECAR_KEYS:
                            _add(needles, data.get(k), f"sidecar:{k}")
                    except (OSError, ValueError):
                        pass
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
            except Exception:
                continue
            for kw in PHI_KEYWORDS:
                if kw in ds:
                    _add(needles, ds.get(kw), kw)
            fm = getattr(ds, "file_meta", None)
            if fm is not None and "MediaStorageSOPInstanceUID" in fm:
                _add(needles, fm.MediaStorageSOPInstanceUID, "MediaStorageSOPInstanceUID")

            def walk(d):
                for el in d:
                    if el.VR == "PN":
                        _add(needles, el.value, f"PN:{el.keyword or el.tag}")
                    elif el.VR == "UI" and el.keyword.endswith(("InstanceUID", "FrameOfReferenceUID")):
                        _add(needles, el.value, el.keyword)
                    elif el.VR == "SQ":
                        for item in el.value:
                            walk(item)
            try:
                walk(ds)
            except Exception:
                pass
    return needles


def scan_cache(cache: str, needles: dict[bytes, str], chunk: int = 64 << 20) -> AuditReport:
    """Search every byte of every file under ``cache`` for the needles."""
    rep = AuditReport(needles=len(needles))
    text_needles = sorted(needles, key=len, reverse=True)
    bin_needles = [n for n in text_needles if len(n) >= MIN_BINARY]
    pats = {
        "text": re.compile(b"|".join(re.escape(n) for n in text_needles)) if text_needles else None,
        "binary": re.compile(b"|".join(re.escape(n) for n in bin_needles)) if bin_needles else None,
    }
    maxlen = max((len(n) for n in text_needles), default=1)
    for dirpath, _, files in os.walk(cache):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            pat = pats["binary"] if f.endswith(BINARY_SUFFIXES) else pats["text"]
            rep.files_scanned += 1
            with open(p, "rb") as fh:
                offset = 0
                tail = b""
                while True:
                    block = fh.read(chunk)
                    if not block:
                        break
                    data = tail + block
                    rep.bytes_scanned += len(block)
                    if pat is not None:
                        for m in pat.finditer(data):
                            if m.end() > len(tail):
                                rep.hits.append((os.path.relpath(p, cache), needles[m.group(0)], offset - len(tail) + m.start()))
                    tail = data[-(maxlen - 1):] if maxlen > 1 else b""
                    offset += len(block)
    return rep


def audit(cache: str, src: str) -> AuditReport:
    """Audit ``cache`` against ``src``; a missing folder is an error, never a clean report."""
    from neurovfm.errors import NeuroVFMError

    for what, path in (("cache", cache), ("source", src)):
        if not os.path.isdir(path):
            raise NeuroVFMError(f"{path}: {what} folder does not exist")
    if not os.path.exists(os.path.join(cache, "index.sqlite")):
        raise NeuroVFMError(f"{cache}: not a token cache (no index.sqlite)")
    return scan_cache(cache, collect_needles(src))
