"""The project's one DICOM series writer: a volume and its geometry -> one file per slice.

Used by the tests (orientation phantoms, bad-input cases), by the benchmark and by the
embedded archive generator. It writes real Part-10 files (CT Image Storage or MR Image
Storage) with the identifying fields a hospital export carries, so that ingestion and the
PHI audit are exercised on realistic headers.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)


@dataclass
class Identity:
    """Made-up identifying fields of one patient and study (PHI to be removed on ingest)."""

    patient_name: str = "DOE^JANE"
    patient_id: str = "MRN0000001"
    birth_date: str = "19700101"
    sex: str = "F"
    age: str = "055Y"
    accession: str = "ACC0000001"
    institution: str = "General Hospital"
    referring_physician: str = "SMITH^JOHN"
    performing_physician: str = "JONES^MARY"
    operator: str = "TECH^ONE"
    study_date: str = "20250102"
    study_time: str = "101500"
    study_description: str = "CT HEAD WO CONTRAST"
    study_uid: str = field(default_factory=generate_uid)


@dataclass
class SeriesSpec:
    """Acquisition facts written into every slice header of one series."""

    modality: str = "CT"  # CT or MR
    series_description: str = "HEAD 5mm"
    series_number: int = 1
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    kernel: str | None = None  # CT convolution kernel
    kvp: float | None = None
    repetition_time: float | None = None  # MR, ms
    echo_time: float | None = None
    inversion_time: float | None = None
    b_value: float | None = None
    flip_angle: float | None = None
    field_strength: float | None = None
    contrast_agent: str | None = None
    scanning_sequence: str | None = None
    manufacturer: str = "NEUROVFM SYNTH"
    model: str = "PHANTOM-1"
    slice_thickness: float | None = None
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0  # CT default; MR uses 0
    body_part: str = "HEAD"
    extra: dict = field(default_factory=dict)  # keyword -> value for special cases


def _sop_class(modality: str) -> str:
    return CTImageStorage if modality == "CT" else MRImageStorage


def write_series(
    out_dir: str,
    planes: np.ndarray,
    positions: np.ndarray,
    row_dir: Sequence[float],
    col_dir: Sequence[float],
    pixel_spacing: tuple[float, float],
    identity: Identity,
    spec: SeriesSpec,
    *,
    filenames: Sequence[str] | None = None,
    instance_order: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    uid_seed: str | None = None,
) -> list[str]:
    """Write ``planes`` [n, rows, cols] (HU for CT, signal for MR) as one file per slice.

    ``positions`` [n, 3] are ImagePositionPatient (LPS, mm) of each slice's first pixel;
    ``row_dir``/``col_dir`` are the LPS direction cosines of a row and a column;
    ``pixel_spacing`` is (row spacing, column spacing). ``instance_order`` renumbers
    InstanceNumber (to test that ingestion sorts by position, not by number). Returns paths.
    """
    planes = np.asarray(planes)
    if planes.ndim != 3:
        raise ValueError("planes must be [n, rows, cols]")
    n, rows, cols = planes.shape
    positions = np.asarray(positions, float)
    if positions.shape != (n, 3):
        raise ValueError("positions must be [n, 3]")
    os.makedirs(out_dir, exist_ok=True)
    slope, intercept = spec.rescale_slope, spec.rescale_intercept
    if spec.modality == "MR":
        intercept = 0.0 if spec.rescale_intercept == -1024.0 else spec.rescale_intercept
    stored = np.rint((planes.astype(np.float64) - intercept) / slope)
    if spec.modality == "CT":
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
        pixel_rep = 1
    else:
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
        pixel_rep = 0
    order = list(instance_order) if instance_order is not None else list(range(n))
    paths = []
    for k in range(n):
        sop_uid = generate_uid(entropy_srcs=[uid_seed, spec.series_uid, str(k)]) if uid_seed else generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _sop_class(spec.modality)
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(spec.image_type)
        ds.Modality = spec.modality
        ds.PatientName = identity.patient_name
        ds.PatientID = identity.patient_id
        ds.PatientBirthDate = identity.birth_date
        ds.PatientSex = identity.sex
        ds.PatientAge = identity.age
        ds.AccessionNumber = identity.accession
        ds.InstitutionName = identity.institution
        ds.ReferringPhysicianName = identity.referring_physician
        ds.PerformingPhysicianName = identity.performing_physician
        ds.OperatorsName = identity.operator
        ds.StudyDate = identity.study_date
        ds.SeriesDate = identity.study_date
        ds.StudyTime = identity.study_time
        ds.StudyDescription = identity.study_description
        ds.SeriesDescription = spec.series_description
        ds.StudyID = identity.accession[-6:]
        ds.StudyInstanceUID = identity.study_uid
        ds.SeriesInstanceUID = spec.series_uid
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = int(order[k]) + 1
        ds.AcquisitionNumber = 1
        ds.Manufacturer = spec.manufacturer
        ds.ManufacturerModelName = spec.model
        ds.BodyPartExamined = spec.body_part
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in list(row_dir) + list(col_dir)]
        ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
        if spec.slice_thickness is not None:
            ds.SliceThickness = f"{spec.slice_thickness:.4f}"
        normal = np.cross(row_dir, col_dir)
        ds.SliceLocation = f"{float(np.dot(normal, positions[k])):.4f}"
        if spec.modality == "CT":
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleType = "HU"
            if spec.kernel:
                ds.ConvolutionKernel = spec.kernel
            if spec.kvp:
                ds.KVP = spec.kvp
            ds.WindowCenter = 40
            ds.WindowWidth = 80
        else:
            for kw, v in (("RepetitionTime", spec.repetition_time), ("EchoTime", spec.echo_time),
                          ("InversionTime", spec.inversion_time), ("FlipAngle", spec.flip_angle),
                          ("MagneticFieldStrength", spec.field_strength), ("DiffusionBValue", spec.b_value),
                          ("ScanningSequence", spec.scanning_sequence)):
                if v is not None:
                    setattr(ds, kw, v)
        if spec.contrast_agent:
            ds.ContrastBolusAgent = spec.contrast_agent
        for kw, v in spec.extra.items():
            setattr(ds, kw, v)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        name = filenames[k] if filenames is not None else f"IM{k:05d}.dcm"
        path = os.path.join(out_dir, name)
        tmp = path + ".part"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def axis_aligned_geometry(n: int, rows: int, cols: int, pixel_spacing: tuple[float, float], step: float,
                          plane: str = "axial", center: Sequence[float] = (0.0, 0.0, 0.0),
                          tilt_deg: float = 0.0, oblique_deg: float = 0.0, reverse: bool = False):
    """Positions and directions (LPS) of a standard acquisition centred on ``center``.

    ``plane``: axial (rows go anterior->posterior), coronal or sagittal. ``tilt_deg``
    shears the stack (gantry tilt: slices stay parallel to the plane but each is shifted
    along the column direction); ``oblique_deg`` rotates the plane about the column axis.
    ``reverse`` stacks slices in the opposite direction.
    """
    if plane == "axial":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    elif plane == "coronal":
        row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    elif plane == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    else:
        raise ValueError(plane)
    if oblique_deg:
        a = np.radians(oblique_deg)
        # rotate the row direction (and with it the normal) about the column direction
        c = col / np.linalg.norm(col)
        row = row * np.cos(a) + np.cross(c, row) * np.sin(a) + c * np.dot(c, row) * (1 - np.cos(a))
    normal = np.cross(row, col)
    if reverse:
        normal = -normal
    ks = np.arange(n) - (n - 1) / 2.0
    center = np.asarray(center, float)
    first_pixel = center - row * pixel_spacing[1] * (cols - 1) / 2 - col * pixel_spacing[0] * (rows - 1) / 2
    shear = np.tan(np.radians(tilt_deg)) * step
    positions = first_pixel[None, :] + np.outer(ks * step, normal) + np.outer(ks * shear, col)
    return positions, row, col


def now_string() -> str:
    return _dt.datetime.now().strftime("%Y%m%d")
