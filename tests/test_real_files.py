"""Ingestion on REAL files shipped with pydicom, pydicom-data, nibabel, dipy and nilearn.

Every file either becomes a valid volume (and tokens), or is refused with a typed
:class:`~neurovfm.errors.IngestError` (``SkipSeries`` for valid but out-of-scope objects)
carrying a code and a reason; no other exception may escape. Multi-slice inputs are built
from real pixel data (a real head-CT slice copied along z, a real enhanced-MR frame set with
functional groups added) and run end to end through ``run_ingest``.

Everything here works offline: pydicom's ``get_testdata_files`` would try to download the
files that pydicom-data does not hold (about 15 s of network time-outs), so the local data
folders are listed directly and single files are looked up with ``download=False``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from scipy import ndimage

from neurovfm.errors import IngestError, SkipSeries
from neurovfm.ingest.classify import classify
from neurovfm.ingest.dicom_headers import SliceRecord, read_header
from neurovfm.ingest.dicom_series import DicomStack, build_stack, group_records
from neurovfm.ingest.geometry import StackGeometry, canonicalize
from neurovfm.ingest.nifti import open_nifti
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.ingest.policy import DEFAULT_POLICY, PreprocessPolicy
from neurovfm.privacy.keys import Keyer
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.patches import tokenize

# pydicom warns (UserWarning) about the deliberately broken files; that is their point
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SECRET = b"test-secret"


# --------------------------------------------------------------------------------------------
# where the real files are
# --------------------------------------------------------------------------------------------

def _pydicom_roots() -> list[str]:
    from pydicom.data import data_manager

    roots = [os.path.join(data_manager.DATA_ROOT, "test_files"), os.path.join(data_manager.DATA_ROOT, "charset_files")]
    try:  # pydicom-data registers itself as an external source
        for src in data_manager.external_data_sources().values():
            path = getattr(src, "data_path", None)
            if path and os.path.isdir(path):
                roots.append(os.fspath(path))
    except Exception:  # pragma: no cover - no external source installed
        pass
    return [r for r in roots if os.path.isdir(r)]


def _all_pydicom_files() -> list[tuple[str, str]]:
    """(id, path) of every local file in the pydicom data folders, with and without extension."""
    out = []
    for root in _pydicom_roots():
        label = os.path.basename(root.rstrip(os.sep))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for f in sorted(filenames):
                if f.startswith(".") or f.endswith((".py", ".pyc")):
                    continue
                p = os.path.join(dirpath, f)
                out.append((f"{label}/{os.path.relpath(p, root)}", p))
    return out


ALL_PYDICOM_FILES = _all_pydicom_files()


def tdf(name: str) -> str:
    """A pydicom test file by name (local only); skip the test if this install lacks it."""
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} is not in this pydicom / pydicom-data install")
    return os.fspath(p)


def _pydicom_subdir(*parts: str) -> str:
    from pydicom.data import data_manager

    p = os.path.join(data_manager.DATA_ROOT, *parts)
    if not os.path.isdir(p):
        pytest.skip(f"{p} not present")
    return p


NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def _dipy_files() -> str | None:
    try:
        import dipy
    except ImportError:  # pragma: no cover
        return None
    p = os.path.join(os.path.dirname(dipy.__file__), "data", "files")
    return p if os.path.isdir(p) else None


def _nifti_files() -> list[tuple[str, str]]:
    out = []
    for label, root in (("nibabel", NIBABEL_DATA), ("dipy", _dipy_files())):
        if not root or not os.path.isdir(root):
            continue
        for f in sorted(os.listdir(root)):
            if f.endswith((".nii", ".nii.gz")):
                out.append((f"{label}/{f}", os.path.join(root, f)))
    return out


NIFTI_FILES = _nifti_files()

_DUMMY_GEOMETRY = StackGeometry(shape=(1, 1, 1), spacing_ij=(1.0, 1.0), dir_i=[1, 0, 0], dir_j=[0, 1, 0],
                                normal=[0, 0, 1], origin=[0, 0, 0], positions=[0.0])


def _decode(records) -> list[np.ndarray]:
    """Decode the first and last plane of a file's records through the public DicomStack."""
    stack = DicomStack(records, _DUMMY_GEOMETRY, records[0].modality)
    ks = sorted({0, len(records) - 1})
    return [stack.plane(k) for k in ks]


def _plane0(name: str) -> np.ndarray:
    return _decode(read_header(tdf(name)))[0]


def _assert_typed(err: IngestError) -> None:
    assert isinstance(err, IngestError)
    assert err.code and isinstance(err.code, str) and " " not in err.code
    assert err.reason and isinstance(err.reason, str)
    assert err.status in ("failed", "skipped")
    if isinstance(err, SkipSeries):
        assert err.status == "skipped"


# --------------------------------------------------------------------------------------------
# 1. every DICOM-ish file: records or a typed refusal, decode or a typed refusal
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [p for _, p in ALL_PYDICOM_FILES], ids=[i for i, _ in ALL_PYDICOM_FILES])
def test_every_pydicom_file_is_read_or_refused_with_a_type(path):
    try:
        records = read_header(path)
    except IngestError as e:  # SkipSeries is a subclass
        _assert_typed(e)
        assert e.path == path
        return
    assert records, "read_header returned no records and raised nothing"
    for r in records:
        assert r.modality in ("CT", "MR")
        assert r.rows > 0 and r.cols > 0
        assert r.path == path
        assert np.isfinite(r.slope) and np.isfinite(r.intercept)

    # pixels: decode, or a typed refusal
    try:
        planes = _decode(records)
    except IngestError as e:
        _assert_typed(e)
    else:
        for r, a in zip((records[0], records[-1]), planes):
            assert a.dtype == np.float32
            assert a.shape == (r.cols, r.rows)  # planes are [i (columns), j (rows)]
            assert np.isfinite(a).all()

    # series: a single image can never be a volume
    for cand in group_records(records):
        try:
            stack = build_stack(cand, DEFAULT_POLICY)
        except IngestError as e:
            _assert_typed(e)
            if len(cand.records) == 1:
                assert e.code == "single_slice", e
            continue
        assert len(cand.records) >= 2
        assert stack.geometry.shape[2] == len(cand.records)


def _pixel_files() -> list[tuple[str, str]]:
    out = []
    for ident, path in ALL_PYDICOM_FILES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" in ds and "Columns" in ds and "SOPInstanceUID" in ds:
            out.append((ident, path))
    return out


PIXEL_FILES = _pixel_files()


@pytest.mark.parametrize("path", [
    pytest.param(p, id=i, marks=[pytest.mark.slow] if os.path.getsize(p) > 5_000_000 else [])  # 120-frame JPEG etc.
    for i, p in PIXEL_FILES
])
def test_decoder_path_on_every_transfer_syntax(path):
    """Whatever the SOP class (screenshots, US, CR included), DicomStack's decoding gives a
    2-D float plane or a typed refusal: JPEG baseline/extended/lossless, JPEG-LS, J2K, RLE,
    deflate, big endian, colour, multi-frame."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rec = SliceRecord(path=path, frame=None, sop_uid=str(ds.SOPInstanceUID), study_uid="s", series_uid="s",
                      modality="MR", sop_class=str(ds.get("SOPClassUID", "")), rows=int(ds.Rows), cols=int(ds.Columns),
                      pixel_spacing=None, iop=None, ipp=None,
                      photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")))
    try:
        (plane,) = _decode([rec])
    except IngestError as e:
        _assert_typed(e)
        assert e.code in ("bad_pixel_data", "no_pixel_data", "unsupported_syntax", "unreadable", "non_finite"), e
        return
    assert plane.shape == (rec.cols, rec.rows) and plane.dtype == np.float32
    assert np.isfinite(plane).all()


def test_the_file_listing_found_the_data():
    names = {os.path.basename(p) for _, p in ALL_PYDICOM_FILES}
    assert {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm"} <= names  # pydicom itself
    assert len(ALL_PYDICOM_FILES) > 100


# files that must be readable single images, decoded with the rescale applied
SINGLE_IMAGES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm",
    "MR_small_deflate.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm", "693_UNCR.dcm", "693_J2KR.dcm", "693_UNCI.dcm", "693_J2KI.dcm",
    "MR2_UNCR.dcm", "MR2_J2KR.dcm", "MR2_UNCI.dcm", "MR2_J2KI.dcm", "J2K_pixelrep_mismatch.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm",
]


@pytest.mark.parametrize("name", SINGLE_IMAGES)
def test_single_images_decode_and_are_refused_as_series(name):
    path = tdf(name)
    records = read_header(path)
    assert len(records) == 1 and records[0].frame is None
    (plane,) = _decode(records)
    assert plane.shape == (records[0].cols, records[0].rows)
    assert np.isfinite(plane).all() and plane.max() > plane.min()
    (cand,) = group_records(records)
    with pytest.raises(IngestError) as ei:
        build_stack(cand, DEFAULT_POLICY)
    assert ei.value.code == "single_slice"
    assert ei.value.status == "failed" and path in str(ei.value)


LOSSLESS_TWINS = [
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_deflate.dcm"),
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_padded.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),
    ("693_UNCI.dcm", "693_J2KI.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm"),
]


@pytest.mark.parametrize("a,b", LOSSLESS_TWINS, ids=[b for _, b in LOSSLESS_TWINS])
def test_transfer_syntaxes_decode_to_the_same_values(a, b):
    np.testing.assert_array_equal(_plane0(a), _plane0(b))


def test_head_ct_slice_has_rescale_applied():
    """693 is a head CT slice stored with intercept -1024: planes are HU, not stored values."""
    for name in ("693_UNCR.dcm", "693_J2KR.dcm"):
        (rec,) = read_header(tdf(name))
        assert rec.modality == "CT" and rec.intercept == -1024.0 and rec.slope == 1.0
        hu = _plane0(name)
        assert hu.min() == pytest.approx(-3024.0)  # padding outside the reconstruction circle
        air = np.mean((hu > -1100) & (hu < -900))
        assert air > 0.2, f"only {air:.2f} of the slice is air (-1000 HU)"
        assert hu.max() < 3100
        stored = pydicom.dcmread(tdf(name)).pixel_array
        np.testing.assert_array_equal(hu, (stored.astype(np.float32) - 1024.0).T)


def test_j2k_pixel_representation_mismatch_gives_plausible_hu():
    """The J2K stream's signedness disagrees with PixelRepresentation; values stay plausible."""
    hu = _plane0("J2K_pixelrep_mismatch.dcm")
    assert hu.min() < 0 and hu.min() > -3100 and hu.max() < 4100


def test_mr2_per_image_rescale_slope_is_applied():
    (rec,) = read_header(tdf("MR2_UNCR.dcm"))
    assert rec.slope == pytest.approx(3.774114)
    stored = pydicom.dcmread(tdf("MR2_UNCR.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_allclose(_plane0("MR2_UNCR.dcm"), (stored * np.float32(rec.slope) + np.float32(rec.intercept)).T,
                               rtol=1e-6)


# typed refusals of specific real files: name -> (exception class, code, status)
REFUSALS = {
    # structured reports, segmentations, RT objects: valid DICOM, not images for this model
    "test-SR.dcm": (SkipSeries, "not_image"),
    "reportsi.dcm": (SkipSeries, "not_image"),
    "reportsi_with_empty_number_tags.dcm": (SkipSeries, "not_image"),
    "liver.dcm": (SkipSeries, "modality"),  # SEG
    "liver_1frame.dcm": (SkipSeries, "modality"),
    "liver_expb.dcm": (SkipSeries, "modality"),
    "rtdose.dcm": (SkipSeries, "modality"),
    "rtdose_1frame.dcm": (SkipSeries, "modality"),
    "rtdose_rle.dcm": (SkipSeries, "modality"),
    "rtplan.dcm": (SkipSeries, "not_image"),
    "rtplan_truncated.dcm": (SkipSeries, "not_image"),
    "rtstruct.dcm": (SkipSeries, "not_image"),  # pre-Part-10 (no preamble, no file meta)
    "ExplVR_BigEndNoMeta.dcm": (SkipSeries, "not_image"),  # pre-Part-10 RT plan, big endian
    "ExplVR_LitEndNoMeta.dcm": (SkipSeries, "not_image"),
    "waveform_ecg.dcm": (SkipSeries, "not_image"),
    # other modalities and screenshots
    "US1_UNCR.dcm": (SkipSeries, "modality"),
    "RG1_UNCR.dcm": (SkipSeries, "modality"),
    "ExplVR_BigEnd.dcm": (SkipSeries, "modality"),
    "SC_rgb.dcm": (SkipSeries, "secondary_capture"),
    "JPEG-lossy.dcm": (SkipSeries, "secondary_capture"),
    "JPEG2000.dcm": (SkipSeries, "secondary_capture"),
    "image_dfl.dcm": (SkipSeries, "secondary_capture"),  # deflated transfer syntax
    "OT-PAL-8-face.dcm": (SkipSeries, "secondary_capture"),
    # malformed files
    "no_meta.dcm": (IngestError, "not_dicom"),  # CT_small minus its meta, unparseable as written
    "meta_missing_tsyntax.dcm": (SkipSeries, "not_image"),
    "no_meta_group_length.dcm": (SkipSeries, "not_image"),
    "empty_charset_LEI.dcm": (SkipSeries, "not_image"),
    "UN_sequence.dcm": (IngestError, "incomplete_header"),  # says CT image storage, holds one sequence
    # enhanced MR without functional groups: ten frames, no position for any of them
    "emri_small.dcm": (IngestError, "missing_geometry"),
    "emri_small_RLE.dcm": (IngestError, "missing_geometry"),
    "emri_small_big_endian.dcm": (IngestError, "missing_geometry"),
    "emri_small_jpeg_2k_lossless.dcm": (IngestError, "missing_geometry"),
    "emri_small_jpeg_ls_lossless.dcm": (IngestError, "missing_geometry"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": (IngestError, "missing_geometry"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_known_files_are_refused_with_the_right_code(name):
    cls, code = REFUSALS[name]
    path = tdf(name)
    with pytest.raises(cls) as ei:
        read_header(path)
    e = ei.value
    _assert_typed(e)
    assert e.code == code, f"{name}: {e}"
    assert e.status == ("skipped" if cls is SkipSeries else "failed")
    assert e.path == path and e.reason in str(e) and name in str(e)


def test_dicomdir_index_files_are_skipped():
    d = _pydicom_subdir("test_files", "dicomdirtests")
    names = ["DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-implicit", "DICOMDIR-nooffset", "DICOMDIR-reordered"]
    for n in names:
        with pytest.raises(SkipSeries) as ei:
            read_header(os.path.join(d, n))
        assert ei.value.code == "dicomdir"


def test_non_dicom_files_are_not_dicom():
    d = _pydicom_subdir("test_files")
    for n in ("README.txt", "crayons.icc", "rtplan.dump", "zipMR.gz", "test1.json"):
        p = os.path.join(d, n)
        if not os.path.exists(p):
            continue
        with pytest.raises(IngestError) as ei:
            read_header(p)
        assert ei.value.code == "not_dicom" and ei.value.status == "failed"


def test_truncated_pixel_data_is_a_typed_decode_refusal():
    """MR_truncated.dcm: the header is intact, the pixel data is cut short."""
    path = tdf("MR_truncated.dcm")
    records = read_header(path)
    with pytest.raises(IngestError) as ei:
        _decode(records)
    assert ei.value.code == "bad_pixel_data" and ei.value.path == path


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_truncated_copies_of_real_files(tmp_path, name):
    """Cut a real image file at many points: typed refusals, and a cut CT/MR is never 'skipped'."""
    blob = open(tdf(name), "rb").read()
    cuts = sorted({0, 1, 64, 128, 132, 200, 400, 800, len(blob) // 2, len(blob) - 1000, len(blob) - 1})
    outcomes = {}
    for cut in cuts:
        p = tmp_path / f"cut{cut:07d}.dcm"
        p.write_bytes(blob[:cut])
        try:
            records = read_header(str(p))
        except IngestError as e:
            _assert_typed(e)
            assert e.status == "failed", f"cut at {cut} bytes reported as {e.status}: {e}"
            outcomes[cut] = e.code
            continue
        try:
            _decode(records)
            outcomes[cut] = "decoded"
        except IngestError as e:
            _assert_typed(e)
            assert e.status == "failed"
            outcomes[cut] = e.code
    assert outcomes[0] in ("not_dicom", "unreadable")
    assert outcomes[132] in ("not_dicom", "unreadable")  # preamble and magic only
    assert outcomes[400] in ("incomplete_header", "unreadable")  # file meta says CT/MR image, header cut
    if name in ("CT_small.dcm", "MR_small_bigendian.dcm"):  # native pixel data: a short value is refused
        assert outcomes[len(blob) - 1000] == "bad_pixel_data"
        assert outcomes[len(blob) // 2] == "bad_pixel_data"


def test_corrupted_bytes_in_a_real_file(tmp_path):
    """Overwrite spans of a real CT with noise: typed outcome each time."""
    blob = bytearray(open(tdf("CT_small.dcm"), "rb").read())
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(132, 3000, 150)):
        bad = bytearray(blob)
        bad[start:start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        p = tmp_path / f"noise{i:03d}.dcm"
        p.write_bytes(bytes(bad))
        try:
            records = read_header(str(p))
        except IngestError as e:
            _assert_typed(e)
            continue
        try:
            _decode(records)
            for c in group_records(records):
                build_stack(c, DEFAULT_POLICY)
        except IngestError as e:
            _assert_typed(e)


# --------------------------------------------------------------------------------------------
# multi-frame: enhanced CT (real), enhanced MR (real frames, functional groups added)
# --------------------------------------------------------------------------------------------

def test_enhanced_ct_multiframe_becomes_a_volume():
    """eCT_Supplemental.dcm: enhanced CT, two frames 10 mm apart (a CT perfusion map)."""
    path = tdf("eCT_Supplemental.dcm")
    records = read_header(path)
    assert [r.frame for r in records] == [0, 1]
    assert records[0].sop_class == "1.2.840.10008.5.1.4.1.1.2.1"
    assert len({r.ipp for r in records}) == 2
    (cand,) = group_records(records)
    stack = build_stack(cand, DEFAULT_POLICY)
    assert stack.geometry.shape == (512, 512, 2)
    assert stack.geometry.spacing[2] == pytest.approx(10.0)
    planes = [stack.plane(k) for k in range(2)]
    assert all(np.isfinite(p).all() for p in planes) and not np.array_equal(planes[0], planes[1])
    cv = canonicalize(stack, DEFAULT_POLICY)
    d, h, w = cv.data.shape
    assert (d, h, w) == (4, 192, 192)
    assert d % 4 == 0 and h % 16 == 0 and w % 16 == 0
    assert np.isfinite(cv.data).all()
    # HU (intercept -1024 applied): air at -1024; the cubic spline may overshoot a little where
    # the last slice is extrapolated 2 mm past the second frame (the reference's size rule)
    assert np.median(cv.data) == pytest.approx(-1024.0, abs=1.0)
    assert cv.data.min() > -2000 and cv.data.max() < 3100
    np.testing.assert_allclose(np.linalg.norm(cv.affine[:3, :3], axis=0), [4, 1, 1], atol=1e-6)
    np.testing.assert_allclose(cv.affine[:3, 0], [0, 0, -4], atol=1e-6)  # slices run toward inferior
    assert cv.affine[2, 3] == pytest.approx(-149.0)  # first slice is the superior frame (LPS z -149)
    # perfusion maps are classified as such and kept out by the pipeline
    first = cand.first
    assert classify(first.modality, first.attrs, first.image_type, first.b_value, first.echo_time).perfusion


EMRI_VARIANTS = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                 "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"]


def _emri_with_groups(name: str, out_dir) -> tuple[str, np.ndarray]:
    """Add the functional groups emri_small lacks: 1 mm pixels, axial frames 1.2 mm apart.

    Frames are given descending z in file order, so stacking must sort them.
    """
    ds = pydicom.dcmread(tdf(name))
    n = int(ds.NumberOfFrames)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [1.0, 1.0]
    pm.SliceThickness = float(ds.SpacingBetweenSlices)
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for f in range(n):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-32.0, -32.0, -float(ds.SpacingBetweenSlices) * f]
        item.PlanePositionSequence = Sequence([pp])
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = f + 1
        item.FrameContentSequence = Sequence([fc])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    path = os.path.join(str(out_dir), name)
    ds.save_as(path)
    return path, pydicom.dcmread(tdf(name)).pixel_array.astype(np.float32)


@pytest.mark.parametrize("name", EMRI_VARIANTS)
def test_enhanced_mr_frames_become_a_canonical_volume(tmp_path, name):
    path, frames = _emri_with_groups(name, tmp_path)
    records = read_header(path)
    assert [r.frame for r in records] == list(range(10))
    assert records[0].sop_class == "1.2.840.10008.5.1.4.1.1.4.1"
    (cand,) = group_records(records)
    stack = build_stack(cand, DEFAULT_POLICY)
    assert stack.geometry.shape == (64, 64, 10)
    assert stack.geometry.spacing[2] == pytest.approx(1.2)
    # 10 x 1.2 mm = 12 mm: fewer than the 4 slices of 4 mm one token needs, a clear refusal
    with pytest.raises(IngestError) as ei:
        canonicalize(stack, DEFAULT_POLICY, name=path)
    assert ei.value.code == "too_small" and ei.value.path == path
    # at 1 mm slices it is a volume; its first slice is the top frame, x flipped to point Right
    cv = canonicalize(stack, PreprocessPolicy(slice_spacing_mm=1.0), name=path)
    assert cv.data.shape == (12, 64, 64) and cv.plane == "axial"
    assert np.isfinite(cv.data).all()
    np.testing.assert_allclose(cv.data[0], frames[0][:, ::-1], atol=1e-2)
    # columns: D toward inferior, H toward posterior, W toward the patient's right (RAS mm)
    np.testing.assert_allclose(cv.affine[:3, :3], [[0, 0, 1], [0, -1, 0], [-1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(cv.affine[:3, 3], [-31.0, 32.0, 0.0], atol=1e-6)


def test_enhanced_mr_identical_across_transfer_syntaxes(tmp_path):
    vols = {}
    for name in EMRI_VARIANTS:
        path, _ = _emri_with_groups(name, tmp_path)
        stack = build_stack(group_records(read_header(path))[0], DEFAULT_POLICY)
        vols[name] = canonicalize(stack, PreprocessPolicy(slice_spacing_mm=1.0)).data
    ref = vols["emri_small.dcm"]
    for name, v in vols.items():
        np.testing.assert_array_equal(v, ref, err_msg=name)


# --------------------------------------------------------------------------------------------
# real multi-slice series from the pydicom DICOMDIR test tree
# --------------------------------------------------------------------------------------------

def _series_outcomes(folder: str) -> list[str]:
    recs = []
    for f in sorted(os.listdir(folder)):
        try:
            recs += read_header(os.path.join(folder, f))
        except IngestError:
            pass
    out = []
    for c in group_records(recs):
        try:
            stack = build_stack(c, DEFAULT_POLICY)
            canonicalize(stack, DEFAULT_POLICY)
            out.append("ok")
        except IngestError as e:
            _assert_typed(e)
            out.append(e.code)
    return out


def test_real_small_series_are_refused_with_reasons():
    base = _pydicom_subdir("test_files", "dicomdirtests")
    # 4 axial CT slices, 200 mm gap between the first two
    assert _series_outcomes(os.path.join(base, "77654033", "CT2")) == ["missing_slices"]
    # 5 contiguous axial CT slices of 16 x 16 pixels (8 mm): too small for one 16 mm token
    assert _series_outcomes(os.path.join(base, "98892001", "CT5N")) == ["too_small"]
    # 3-plane localizer and radial MR: every image is its own orientation -> single slices
    assert set(_series_outcomes(os.path.join(base, "98892003", "MR2"))) == {"single_slice"}
    assert set(_series_outcomes(os.path.join(base, "98892003", "MR700"))) == {"single_slice"}


# --------------------------------------------------------------------------------------------
# 2. a real head-CT slice stacked into a volume, end to end
# --------------------------------------------------------------------------------------------

def _write_ct_stack(src_dir, n: int = 8, step: float = 5.0, names=("693_UNCR.dcm", "693_J2KR.dcm")) -> list[str]:
    """Copies of real CT slices along z (mixed transfer syntaxes), new SOP UIDs, shuffled names."""
    os.makedirs(src_dir, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    order = np.random.default_rng(1).permutation(n)
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(tdf(names[k % len(names)]))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + step * k]
        ds.SliceLocation = z + step * k
        ds.InstanceNumber = k + 1
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = os.path.join(str(src_dir), f"IM{order[k]:04d}")
        ds.save_as(p)
        paths.append(p)
    return paths


def _manifest(cache_dir) -> list[dict]:
    with open(os.path.join(str(cache_dir), "manifest.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_real_ct_slices_stacked_ingest_end_to_end(tmp_path):
    src = tmp_path / "src"
    paths = _write_ct_stack(src)
    # public steps, to look at the canonical HU volume
    records = [r for p in paths for r in read_header(p)]
    (cand,) = group_records(records)
    stack = build_stack(cand, DEFAULT_POLICY)
    assert stack.geometry.shape == (512, 512, 8)
    assert stack.geometry.spacing[2] == pytest.approx(5.0)
    np.testing.assert_allclose(np.diff([r.ipp[2] for r in stack.records]), 5.0)  # sorted by position
    cv = canonicalize(stack, DEFAULT_POLICY)
    assert cv.data.shape == (8, 240, 240) and cv.plane == "axial"
    assert np.isfinite(cv.data).all()
    air = np.mean((cv.data > -1100) & (cv.data < -900))
    assert air > 0.2, "air should be near -1000 HU (rescale intercept applied)"
    assert cv.data.min() < -2500  # the -3024 padding survives
    assert cv.data.max() < 2000 and np.percentile(cv.data, 99) < 1500
    brain = cv.data[(cv.data > 0) & (cv.data < 100)]
    assert brain.size > 0.02 * cv.data.size  # soft tissue at 0..100 HU
    ts = tokenize(cv, "CT", DEFAULT_POLICY)
    assert ts.n_tokens > 0 and ts.storage == "hu16"
    hu = ts.tokens.astype(np.float32) / DEFAULT_POLICY.hu16_scale
    assert hu.min() > DEFAULT_POLICY.ct_background_hu  # only foreground tokens are kept

    cache = tmp_path / "cache"
    summary = run_ingest(str(src), str(cache), IngestOptions(progress=False), keyer=Keyer(SECRET))
    assert (summary.ingested, summary.failed, summary.skipped) == (1, 0, 0), summary.table()
    assert summary.tokens == ts.n_tokens
    (row,) = _manifest(cache)
    assert row["status"] == "ok" and row["modality"] == "CT" and row["kind"] == "series"
    assert int(row["n_tokens"]) == ts.n_tokens
    tc = TokenCache(str(cache))
    try:
        (entry,) = tc.series()
        assert entry.modality == "CT" and entry.plane == "axial"
        toks, coords = tc.raw(entry)
        np.testing.assert_array_equal(np.asarray(toks), ts.tokens)
        np.testing.assert_array_equal(np.asarray(coords), ts.coords)
    finally:
        tc.close()


def test_ct_small_stacked_ingests(tmp_path):
    src = tmp_path / "src"
    _write_ct_stack(src, n=6, step=5.0, names=("CT_small.dcm",))
    cache = tmp_path / "cache"
    summary = run_ingest(str(src), str(cache), IngestOptions(progress=False), keyer=Keyer(SECRET))
    assert summary.ingested == 1 and summary.tokens > 0, summary.table()
    (row,) = _manifest(cache)
    assert row["status"] == "ok" and row["modality"] == "CT"


def test_ct_stack_with_a_missing_slice_is_refused_in_the_manifest(tmp_path):
    src = tmp_path / "src"
    paths = _write_ct_stack(src, n=8)
    os.unlink(paths[4])
    cache = tmp_path / "cache"
    summary = run_ingest(str(src), str(cache), IngestOptions(progress=False), keyer=Keyer(SECRET))
    assert summary.ingested == 0 and summary.failed == 1
    (row,) = _manifest(cache)
    assert (row["status"], row["code"]) == ("failed", "missing_slices") and "missing" in row["reason"]


def test_run_ingest_over_every_pydicom_file(tmp_path):
    """The whole pydicom test corpus as one messy archive: rows with reasons, no crash."""
    src = tmp_path / "src"
    src.mkdir()
    for ident, path in ALL_PYDICOM_FILES:
        os.symlink(path, src / ident.replace("/", "__"))
    cache = tmp_path / "cache"
    summary = run_ingest(str(src), str(cache), IngestOptions(progress=False), keyer=Keyer(SECRET))
    rows = _manifest(cache)
    assert rows and summary.failed + summary.skipped == len(rows) - summary.ingested
    codes = {(r["status"], r["code"]) for r in rows}
    assert all(r["status"] in ("ok", "skipped", "failed") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    assert not any(r["code"] == "internal_error" for r in rows), [r for r in rows if r["code"] == "internal_error"]
    assert not any("unexpected" in (r["reason"] or "") for r in rows)
    for expected in [("skipped", "secondary_capture"), ("skipped", "modality"), ("skipped", "not_image"),
                     ("skipped", "dicomdir"), ("skipped", "perfusion"), ("failed", "single_slice"),
                     ("failed", "not_dicom"), ("failed", "missing_geometry"), ("failed", "missing_slices"),
                     ("failed", "too_small"), ("failed", "incomplete_header")]:
        assert expected in codes, f"{expected} not among {sorted(codes)}"


# --------------------------------------------------------------------------------------------
# 3. NIfTI files from nibabel and dipy
# --------------------------------------------------------------------------------------------

NIFTI_EXPECTED = {
    "anatomical.nii": "ok",  # big-endian int16, LAS
    "example4d.nii.gz": "ok",  # 4-D, two volumes
    "example_nifti2.nii.gz": "ok",  # NIfTI-2
    "functional.nii": "ok",  # 4-D with 20 volumes, evenly subsampled
    "reoriented_anat_moved.nii": "ok",  # big-endian float
    "resampled_anat_moved.nii": "non_finite",  # NaN outside the resampled field of view
    "row_major.dconn.nii": "not_3d",  # CIFTI-2 connectivity matrix
    "standard.nii.gz": "too_small",  # 4 x 5 x 7 voxels
    "S0_10slices.nii.gz": "bad_geometry",  # 53 mm slice "spacing" in its affine
    "aniso_vox.nii.gz": "ok",  # LPS, 4 x 4 x 5 mm
    "ascm_out_test.nii.gz": "ok",  # LPS float64
    "func_coef.nii.gz": "too_small",
    "func_discrete.nii.gz": "too_small",
    "small_101D.nii.gz": "mixed_4d",  # diffusion 4-D with .bval beside it
    "small_25.nii.gz": "mixed_4d",
    "small_64D.nii": "mixed_4d",  # PLS diffusion 4-D
    "test_piesno.nii.gz": "too_small",  # 14 slices of 1 mm along the slice axis chosen
}


def _outcome(path: str, policy: PreprocessPolicy = DEFAULT_POLICY):
    try:
        stacks = open_nifti(path, policy)
    except IngestError as e:
        _assert_typed(e)
        return e.code, []
    cvs = []
    try:
        for st in stacks:
            cvs.append((st, canonicalize(st, policy, name=path)))
    except IngestError as e:
        _assert_typed(e)
        return e.code, []
    return "ok", cvs


def _check_canonical_geometry(cv, orig_affine: np.ndarray, orig_shape, policy: PreprocessPolicy = DEFAULT_POLICY):
    """Canonical voxel centres sit in the original field of view, on the original axes."""
    A = np.asarray(orig_affine, float)
    n = np.asarray(orig_shape[:3], float)
    s = np.linalg.norm(A[:3, :3], axis=0)
    orig_dirs = A[:3, :3] / s
    C = cv.affine[:3, :3]
    norms = np.linalg.norm(C, axis=0)
    np.testing.assert_allclose(norms, [policy.slice_spacing_mm, policy.inplane_spacing_mm, policy.inplane_spacing_mm],
                               rtol=1e-6)
    # each canonical axis is parallel to exactly one original axis (permutation and flips only)
    dots = np.abs((C / norms).T @ orig_dirs)  # [canonical axis, original axis]
    match = np.argmax(dots, axis=1)
    assert sorted(match.tolist()) == [0, 1, 2]
    np.testing.assert_allclose(dots[np.arange(3), match], 1.0, atol=1e-6)
    # the slice axis of the canonical grid is the world axis named by cv.slice_axis
    assert int(np.argmax(np.abs(C[:, 0]))) == cv.slice_axis
    # corners of the canonical grid, mapped back to original voxel indices
    D, H, W = cv.data.shape
    corners = np.array([[d, h, w, 1.0] for d in (0, D - 1) for h in (0, H - 1) for w in (0, W - 1)])
    world = corners @ cv.affine.T
    vox = (np.linalg.inv(A) @ world.T).T[:, :3]
    # targets per original axis: the size rule floor(n * s / t) of the reference may put the
    # last centre up to (1 - t/s) voxels past the outer voxel centre when upsampling
    t = np.empty(3)
    t[match] = norms
    slack = np.maximum(0.0, 1.0 - t / s) + 1e-6
    assert np.all(vox >= -slack), (vox.min(0), slack)
    assert np.all(vox <= n - 1 + slack), (vox.max(0), n - 1, slack)
    # the grid is centred on the original field of view (centred crop)
    centre = np.array([(D - 1) / 2, (H - 1) / 2, (W - 1) / 2, 1.0]) @ cv.affine.T
    centre_vox = (np.linalg.inv(A) @ centre)[:3]
    assert np.all(np.abs(centre_vox - (n - 1) / 2) * s <= np.maximum(s, t) + 1e-6)


def _independent_resample(data: np.ndarray, orig_affine: np.ndarray, cv) -> np.ndarray:
    """Cubic B-spline (mirror boundary) sampling of the original at the canonical voxel centres."""
    D, H, W = cv.data.shape
    idx = np.stack(np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij"), -1).reshape(-1, 3)
    world = idx @ cv.affine[:3, :3].T + cv.affine[:3, 3]
    vox = (world - orig_affine[:3, 3]) @ np.linalg.inv(orig_affine[:3, :3]).T
    coeff = ndimage.spline_filter(np.asarray(data, np.float64), order=3, mode="mirror")
    return ndimage.map_coordinates(coeff, vox.T, order=3, mode="mirror", prefilter=False).reshape(D, H, W)


@pytest.mark.parametrize("path", [p for _, p in NIFTI_FILES], ids=[i for i, _ in NIFTI_FILES])
def test_nifti_files_canonical_or_refused(path):
    name = os.path.basename(path)
    code, cvs = _outcome(path)
    if name in NIFTI_EXPECTED:
        assert code == NIFTI_EXPECTED[name], f"{name}: got {code}"
    if code != "ok":
        return
    img = nib.load(path)
    assert cvs
    for st, cv in cvs:
        d, h, w = cv.data.shape
        assert d % 4 == 0 and h % 16 == 0 and w % 16 == 0
        assert np.isfinite(cv.data).all()
        _check_canonical_geometry(cv, img.affine, img.shape)


# example4d / example_nifti2 have slices that no output slice reaches directly; a cubic
# prefilter run over a stack where those planes were never resampled (left at zero) gets
# their neighbours wrong (error ~1.7 % of the range at 75be275); the full-range check guards it
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=i) for i, p in NIFTI_FILES if NIFTI_EXPECTED.get(os.path.basename(p)) == "ok"],
)
def test_nifti_canonical_values_match_an_independent_resampler(path):
    """Voxel values at the canonical affine's positions equal scipy's cubic B-spline samples."""
    code, cvs = _outcome(path)
    assert code == "ok"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 4:
        data = data[..., 0]  # the first stack is the first volume
    st, cv = cvs[0]
    ref = _independent_resample(data, img.affine, cv)
    rng = float(np.ptp(data)) or 1.0
    assert np.abs(ref - cv.data).max() / rng < 1e-4


def test_real_pls_volume_from_dipy(tmp_path):
    """small_64D.nii is stored P-L-S; its b0 volume saved as a 3-D file is canonicalised."""
    d = _dipy_files()
    if d is None or not os.path.exists(os.path.join(d, "small_64D.nii")):
        pytest.skip("dipy small_64D.nii not available")
    img = nib.load(os.path.join(d, "small_64D.nii"))
    assert nib.aff2axcodes(img.affine) == ("P", "L", "S")
    b0 = np.asanyarray(img.dataobj)[..., 0]
    p = tmp_path / "pls.nii"
    nib.save(nib.Nifti1Image(b0, img.affine), str(p))
    code, cvs = _outcome(str(p))
    assert code == "ok"
    (st, cv), = cvs
    _check_canonical_geometry(cv, img.affine, b0.shape)
    ref = _independent_resample(b0.astype(np.float32), img.affine, cv)
    assert np.abs(ref - cv.data).max() / float(np.ptp(b0)) < 1e-4


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_truncated_nifti_is_unreadable(tmp_path, name):
    src = os.path.join(NIBABEL_DATA, name)
    if not os.path.exists(src):
        pytest.skip(f"{name} not in this nibabel")
    blob = open(src, "rb").read()
    for cut in (10, 300, len(blob) // 2):
        p = tmp_path / f"cut{cut}_{name}"
        p.write_bytes(blob[:cut])
        with pytest.raises(IngestError) as ei:
            open_nifti(str(p), DEFAULT_POLICY)
        _assert_typed(ei.value)
        assert ei.value.code == "unreadable" and ei.value.path == str(p)


# --------------------------------------------------------------------------------------------
# MNI152 template (nilearn, offline): end to end, sidecars, orientation invariance
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mni():
    datasets = pytest.importorskip("nilearn.datasets")
    try:
        img = datasets.load_mni152_template(resolution=1)
    except Exception as exc:  # pragma: no cover - nilearn without its bundled template
        pytest.skip(f"MNI template not available offline ({type(exc).__name__})")
    data = np.asarray(img.get_fdata(), np.float32)
    affine = np.asarray(img.affine, float)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    return data, affine


def test_mni_t1w_with_sidecar_ingests_end_to_end(tmp_path, mni):
    data, affine = mni
    src = tmp_path / "src" / "sub-01" / "anat"
    src.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), str(src / "sub-01_T1w.nii.gz"))
    (src / "sub-01_T1w.json").write_text(json.dumps({"Modality": "MR"}))
    cache = tmp_path / "cache"
    summary = run_ingest(str(tmp_path / "src"), str(cache), IngestOptions(progress=False), keyer=Keyer(SECRET))
    assert (summary.ingested, summary.failed, summary.skipped) == (1, 0, 0), summary.table()
    assert summary.tokens > 0
    (row,) = _manifest(cache)
    assert row["status"] == "ok" and row["modality"] == "MR" and row["sequence"] == "T1"
    tc = TokenCache(str(cache))
    try:
        (entry,) = tc.series()
        assert entry.sequence == "T1" and entry.source_format == "nifti" and entry.plane == "sagittal"
        assert json.loads(entry.shape) == [48, 224, 176]
    finally:
        tc.close()


def test_nifti_without_sidecar_needs_a_modality(tmp_path, mni):
    data, affine = mni
    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(src / "mni_T1w.nii"))
    summary = run_ingest(str(src), str(tmp_path / "c1"), IngestOptions(progress=False), keyer=Keyer(SECRET))
    assert summary.ingested == 0 and summary.failed == 1
    (row,) = _manifest(tmp_path / "c1")
    assert (row["kind"], row["status"], row["code"]) == ("file", "failed", "unknown_modality")
    assert "modality" in row["reason"]
    summary = run_ingest(str(src), str(tmp_path / "c2"), IngestOptions(progress=False, modality="mr"),
                         keyer=Keyer(SECRET))
    assert summary.ingested == 1 and summary.failed == 0
    (row,) = _manifest(tmp_path / "c2")
    assert row["status"] == "ok" and row["modality"] == "MR" and row["sequence"] == "T1"


def _reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> nib.Nifti1Image:
    """The same anatomy stored with axes in another order / direction (affine adjusted)."""
    img = nib.Nifti1Image(data, affine)
    out = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes))))
    assert "".join(nib.aff2axcodes(out.affine)) == codes
    return nib.Nifti1Image(np.asarray(out.dataobj, np.float32), out.affine)


ORIENTATIONS = ["LPS", "PLS", "ASL", "IPR", "SAR", "LIA"]


@pytest.fixture(scope="module")
def mni_ras_canonical(mni, tmp_path_factory):
    data, affine = mni
    p = tmp_path_factory.mktemp("mni") / "ras.nii"
    nib.save(nib.Nifti1Image(data, affine), str(p))
    (st,) = open_nifti(str(p), DEFAULT_POLICY)
    cv = canonicalize(st, DEFAULT_POLICY)
    _check_canonical_geometry(cv, affine, data.shape)
    return cv


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_mni_orientation_invariance(tmp_path, mni, mni_ras_canonical, codes):
    data, affine = mni
    img = _reoriented(data, affine, codes)
    p = tmp_path / f"mni_{codes}.nii"
    nib.save(img, str(p))
    (st,) = open_nifti(str(p), DEFAULT_POLICY)
    cv = canonicalize(st, DEFAULT_POLICY)
    ref = mni_ras_canonical
    assert cv.data.shape == ref.data.shape and cv.plane == ref.plane == "sagittal"
    np.testing.assert_allclose(cv.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(cv.data, ref.data, atol=1e-5)
    _check_canonical_geometry(cv, img.affine, img.shape)


@pytest.mark.parametrize("codes", ["RAS", "LAI", "PLS", "SPL", "AIR"])
def test_anisotropic_real_volume_orientation_invariance(tmp_path, codes):
    """aniso_vox (4 x 4 x 5 mm, stored LPS, ~35 degrees oblique): storage order does not matter."""
    d = _dipy_files()
    if d is None or not os.path.exists(os.path.join(d, "aniso_vox.nii.gz")):
        pytest.skip("dipy aniso_vox.nii.gz not available")
    src = nib.load(os.path.join(d, "aniso_vox.nii.gz"))
    data = np.asarray(src.get_fdata(), np.float32)
    p0 = tmp_path / "lps.nii"
    nib.save(nib.Nifti1Image(data, src.affine), str(p0))
    ref = canonicalize(open_nifti(str(p0), DEFAULT_POLICY)[0], DEFAULT_POLICY)
    img = _reoriented(data, src.affine, codes)
    p = tmp_path / f"aniso_{codes}.nii"
    nib.save(img, str(p))
    cv = canonicalize(open_nifti(str(p), DEFAULT_POLICY)[0], DEFAULT_POLICY)
    assert cv.data.shape == ref.data.shape and cv.plane == ref.plane == "axial"
    np.testing.assert_allclose(cv.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(cv.data, ref.data, atol=1e-3 * float(np.ptp(data)))
    _check_canonical_geometry(cv, img.affine, img.shape)


@pytest.mark.parametrize("slice_mm", [0.625, 1.0, 2.5])
def test_thin_slice_volume_values_match_an_independent_resampler(tmp_path, mni, slice_mm):
    """Real anatomy on thin slices (0.625 mm, as in thin head-CT reconstructions): going to
    4 mm skips planes between output slices, which must still feed the cubic prefilter."""
    data, _ = mni
    block = np.ascontiguousarray(data[40:160, 40:190, 50:146])  # fewest voxels along z: axial
    affine = np.diag([0.5, 0.5, slice_mm, 1.0])
    affine[:3, 3] = [-30.0, -40.0, -20.0]
    p = tmp_path / "thin.nii"
    nib.save(nib.Nifti1Image(block, affine), str(p))
    (st,) = open_nifti(str(p), DEFAULT_POLICY)
    cv = canonicalize(st, DEFAULT_POLICY)
    assert cv.plane == "axial"
    _check_canonical_geometry(cv, affine, block.shape)
    ref = _independent_resample(block, affine, cv)
    assert np.abs(ref - cv.data).max() / float(np.ptp(block)) < 1e-4
