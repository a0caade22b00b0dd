"""Read what discovery needs from DICOM headers (pixels are not touched).

One :class:`SliceRecord` per 2-D image: a classic file gives one, an enhanced multi-frame
file gives one per frame with geometry, rescale and acquisition values taken from its
functional groups. Identifying values (patient id, UIDs, descriptions) live only in memory
here; they are hashed or dropped before anything is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from neurovfm.errors import IngestError, SkipSeries

IMAGE_STORAGE_CT = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
IMAGE_STORAGE_MR = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class SliceRecord:
    """Header facts about one 2-D image (a file, or one frame of a multi-frame file)."""

    path: str
    frame: int | None
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    sop_class: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    samples_per_pixel: int = 1
    photometric: str = "MONOCHROME2"
    bits_allocated: int = 16
    image_type: tuple[str, ...] = ()
    burned_in: bool = False
    echo_time: float | None = None
    echo_number: int | None = None
    b_value: float | None = None
    acquisition_number: int | None = None
    temporal_index: int | None = None
    stack_id: str | None = None
    slice_thickness: float | None = None
    number_of_frames: int = 1
    file_size: int = 0
    # series-level facts (classification and allowlisted metadata)
    attrs: dict[str, Any] = field(default_factory=dict)

    def geometry_key(self) -> tuple:
        iop = tuple(round(v, 3) for v in self.iop) if self.iop else None
        ps = tuple(round(v, 4) for v in self.pixel_spacing) if self.pixel_spacing else None
        return (self.rows, self.cols, ps, iop)

    def split_key(self) -> tuple:
        """What must be equal for two images to belong to one volume."""
        return (
            self.geometry_key(),
            None if self.echo_time is None else round(self.echo_time, 1),
            self.echo_number,
            None if self.b_value is None else round(self.b_value),
            tuple(t for t in self.image_type[2:4]),
            self.temporal_index,
            self.stack_id,
            self.samples_per_pixel,
        )


def _f(v: Any) -> float | None:
    try:
        if v is None or v == "":
            return None
        if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
            v = v[0]
        return float(v)
    except (TypeError, ValueError):
        return None


def _i(v: Any) -> int | None:
    f = _f(v)
    return None if f is None else int(f)


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(x) for x in v)
    return str(v)


def _seq_item(ds: Any, keyword: str) -> Any:
    seq = getattr(ds, keyword, None) if ds is not None else None
    if seq is None:
        return None
    try:
        return seq[0] if len(seq) else None
    except TypeError:
        return None


def _fg(frame: Any, shared: Any, seq: str, attr: str) -> Any:
    """A functional-group value: per-frame first, then shared."""
    for grp in (frame, shared):
        item = _seq_item(grp, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _b_value(ds: Any) -> float | None:
    v = _f(ds.get("DiffusionBValue"))
    if v is not None:
        return v
    for tag in (0x0019100C, 0x00431039):  # Siemens CSA b-value, GE slop_int_6..9 (first value)
        el = ds.get(tag)
        if el is not None:
            try:
                val = el.value
                if isinstance(val, bytes):
                    val = val.decode(errors="ignore").split("\\")
                v = _f(val)
                if v is not None:
                    return v % 1e9 if tag == 0x00431039 else v  # GE stores a large offset on some versions
            except Exception:  # private tags are best effort only
                return None
    return None


def _age_years(ds: Any) -> int | None:
    age = _s(ds.get("PatientAge")).strip()
    years: float | None = None
    if len(age) == 4 and age[:3].isdigit():
        n, unit = int(age[:3]), age[3].upper()
        years = {"Y": n, "M": n / 12, "W": n / 52.18, "D": n / 365.25}.get(unit)
    if years is None:
        b, s = _s(ds.get("PatientBirthDate")), _s(ds.get("StudyDate") or ds.get("AcquisitionDate"))
        if len(b) >= 8 and len(s) >= 8 and b[:8].isdigit() and s[:8].isdigit():
            by, bm, bd = int(b[:4]), int(b[4:6]), int(b[6:8])
            sy, sm, sd = int(s[:4]), int(s[4:6]), int(s[6:8])
            years = sy - by - ((sm, sd) < (bm, bd))
    if years is None:
        return None
    return int(min(max(years, 0), 90))


def _series_attrs(ds: Any, shared: Any, frame0: Any) -> dict[str, Any]:
    """Series-level values. Keys starting with ``_`` are transient (classification only)."""
    def g(kw: str) -> Any:
        return ds.get(kw)

    tr = _f(g("RepetitionTime")) or _f(_fg(frame0, shared, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
    ti = _f(g("InversionTime")) or _f(_fg(frame0, shared, "MRModifierSequence", "InversionTimes"))
    fa = _f(g("FlipAngle")) or _f(_fg(frame0, shared, "MRTimingAndRelatedParametersSequence", "FlipAngle"))
    kernel = _s(g("ConvolutionKernel")) or _s(_fg(frame0, shared, "CTReconstructionSequence", "ConvolutionKernel"))
    contrast_agent = _s(g("ContrastBolusAgent"))
    if not contrast_agent:
        item = _seq_item(ds, "ContrastBolusAgentSequence")
        contrast_agent = "yes" if item is not None else ""
    return {
        "repetition_time_ms": tr,
        "inversion_time_ms": ti,
        "flip_angle_deg": fa,
        "field_strength_t": _f(g("MagneticFieldStrength")),
        "kvp": _f(g("KVP")) or _f(_fg(frame0, shared, "CTXRayDetailsSequence", "KVP")),
        "manufacturer": _s(g("Manufacturer"))[:64],
        "model": _s(g("ManufacturerModelName"))[:64],
        "sex": (_s(g("PatientSex"))[:1].upper() or "U") if _s(g("PatientSex"))[:1].upper() in ("M", "F", "O") else "U",
        "age_years": _age_years(ds),
        "body_part": _s(g("BodyPartExamined")).upper()[:16],
        "_kernel": kernel,
        "_contrast_agent": contrast_agent,
        "_scanning_sequence": _s(g("ScanningSequence")),
        "_sequence_variant": _s(g("SequenceVariant")),
        "_sequence_name": _s(g("SequenceName")) or _s(g("PulseSequenceName")),
        "_description": " ".join(
            _s(g(k)) for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
        ).lower(),
        "_patient_id": _s(g("PatientID")) or _s(g("PatientName")),
        "_window_center": _f(g("WindowCenter")),
    }


_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _looks_like_dicom(ds: Any) -> bool:
    """Whether a dataset read with ``force=True`` (no preamble, no file meta) is real DICOM.

    Forced reads of arbitrary bytes give garbage elements; a real pre-Part-10 object has a
    SOP Instance UID and either image dimensions or a well-formed SOP Class UID, which lets
    non-image objects (RT structures, plans) be skipped as such rather than called non-DICOM.
    """
    if "SOPInstanceUID" not in ds:
        return False
    if "Rows" in ds:
        return True
    return "SOPClassUID" in ds and bool(_UID.match(_s(ds.get("SOPClassUID")).strip()))


def read_header(path: str) -> list[SliceRecord]:
    """Header records of one file, or a typed refusal naming it.

    Raises :class:`IngestError` (status ``failed``) for unreadable or non-image files and
    :class:`SkipSeries` for valid DICOM that is out of scope (DICOMDIR, SR, SEG, ...).
    """
    try:
        size = os.path.getsize(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        try:  # pre-Part-10 files have no preamble; accept them only if they look like DICOM
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if not _looks_like_dicom(ds):
                raise IngestError("not_dicom", "not a DICOM or NIfTI file", path)
        except IngestError:
            raise
        except Exception as exc:
            raise IngestError("not_dicom", f"not a DICOM or NIfTI file ({type(exc).__name__})", path) from None
    except Exception as exc:  # truncated headers, bad lengths, unreadable files
        raise IngestError("unreadable", f"DICOM header cannot be parsed ({type(exc).__name__}: {str(exc)[:80]})", path) from None

    sop_class = _s(ds.get("SOPClassUID") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise SkipSeries("dicomdir", "DICOMDIR index file, not an image", path)
    modality = _s(ds.get("Modality")).upper()
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        raise SkipSeries("secondary_capture", "secondary capture (screenshot or scanned image)", path)
    if "Rows" not in ds or "Columns" not in ds:
        if sop_class in IMAGE_STORAGE_CT | IMAGE_STORAGE_MR:
            # a CT/MR image object without image attributes is broken (usually cut short), not out of scope
            raise IngestError(
                "incomplete_header",
                f"{modality or 'CT/MR'} image object without Rows/Columns (truncated or incomplete header)",
                path,
            )
        if len(ds) == 0:
            raise IngestError("unreadable", "DICOM file holds no data elements (truncated?)", path)
        raise SkipSeries("not_image", f"no image in this DICOM object (modality {modality or '?'})", path)
    if modality not in ("CT", "MR"):
        raise SkipSeries("modality", f"modality {modality or 'missing'} is not CT or MR", path)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise IngestError("bad_dimensions", "Rows/Columns cannot be read", path) from None
    study = _s(ds.get("StudyInstanceUID"))
    series = _s(ds.get("SeriesInstanceUID"))
    sop = _s(ds.get("SOPInstanceUID"))
    if not (study and series and sop):
        raise IngestError("missing_uids", "study, series or SOP instance UID missing", path)
    image_type = tuple(t.strip().upper() for t in _s(ds.get("ImageType")).split("\\") if t.strip())
    burned = _s(ds.get("BurnedInAnnotation")).upper() == "YES"
    n_frames = _i(ds.get("NumberOfFrames")) or 1
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    frame0 = per_frame[0] if per_frame is not None and len(per_frame) else None
    attrs = _series_attrs(ds, shared, frame0)

    common = dict(
        path=path, sop_uid=sop, study_uid=study, series_uid=series, modality=modality,
        sop_class=sop_class, rows=rows, cols=cols,
        samples_per_pixel=_i(ds.get("SamplesPerPixel")) or 1,
        photometric=_s(ds.get("PhotometricInterpretation")).upper() or "MONOCHROME2",
        bits_allocated=_i(ds.get("BitsAllocated")) or 16,
        burned_in=burned, number_of_frames=n_frames, file_size=size, attrs=attrs,
    )

    if per_frame is None and n_frames > 1:
        # classic multi-frame object (or enhanced without functional groups): one position
        # for all frames, so the frames cannot be placed in space
        raise IngestError(
            "missing_geometry",
            f"multi-frame image ({n_frames} frames) without per-frame functional groups; frame positions unknown",
            path,
        )
    if per_frame is None or n_frames <= 1 and shared is None:
        ps = ds.get("PixelSpacing")
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        try:
            rec = SliceRecord(
                frame=None,
                pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None and len(ps) >= 2 else None,
                iop=tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
                ipp=tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None,
                slope=_f(ds.get("RescaleSlope")) or 1.0,
                intercept=_f(ds.get("RescaleIntercept")) or 0.0,
                image_type=image_type,
                echo_time=_f(ds.get("EchoTime")),
                echo_number=_i(ds.get("EchoNumbers")),
                b_value=_b_value(ds),
                acquisition_number=_i(ds.get("AcquisitionNumber")),
                temporal_index=_i(ds.get("TemporalPositionIdentifier")),
                slice_thickness=_f(ds.get("SliceThickness")),
                **common,
            )
        except (TypeError, ValueError):
            raise IngestError("bad_geometry", "pixel spacing, orientation or position cannot be parsed", path) from None
        return [rec]

    # enhanced multi-frame: one record per frame
    records = []
    for f in range(n_frames):
        fr = per_frame[f] if f < len(per_frame) else None
        ps = _fg(fr, shared, "PixelMeasuresSequence", "PixelSpacing")
        iop = _fg(fr, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = _fg(fr, shared, "PlanePositionSequence", "ImagePositionPatient")
        ftype = _fg(fr, shared, "MRImageFrameTypeSequence", "FrameType") or _fg(
            fr, shared, "CTImageFrameTypeSequence", "FrameType")
        content = _seq_item(fr, "FrameContentSequence")
        try:
            rec = SliceRecord(
                frame=f,
                pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
                iop=tuple(float(v) for v in iop) if iop is not None else None,
                ipp=tuple(float(v) for v in ipp) if ipp is not None else None,
                slope=_f(_fg(fr, shared, "PixelValueTransformationSequence", "RescaleSlope"))
                or _f(ds.get("RescaleSlope")) or 1.0,
                intercept=_f(_fg(fr, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
                or _f(ds.get("RescaleIntercept")) or 0.0,
                image_type=tuple(t.upper() for t in ftype) if ftype else image_type,
                echo_time=_f(_fg(fr, shared, "MREchoSequence", "EffectiveEchoTime")),
                echo_number=None,
                b_value=_f(_fg(fr, shared, "MRDiffusionSequence", "DiffusionBValue")),
                acquisition_number=None,
                temporal_index=_i(content.get("TemporalPositionIndex")) if content is not None else None,
                stack_id=_s(content.get("StackID")) if content is not None and "StackID" in content else None,
                slice_thickness=_f(_fg(fr, shared, "PixelMeasuresSequence", "SliceThickness")),
                **common,
            )
        except (TypeError, ValueError):
            raise IngestError("bad_geometry", f"frame {f}: geometry cannot be parsed", path) from None
        records.append(rec)
    return records
