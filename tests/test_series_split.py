"""Discovery: grouping, splitting mixed series, policy skips, and what each series is."""

from __future__ import annotations

import pydicom
import pytest

from neurovfm.ingest.classify import classify, ct_kernel, mr_sequence, skip_reason
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.synth.dicom_writer import Identity, SeriesSpec
from neurovfm.synth.phantom import write_phantom_series
from neurovfm.tokens.cache import TokenCache

SMALL = dict(n=12, rows=100, cols=96, ps=(2.0, 2.0), step=5.0)


def _ingest(src, tmp_path, keyer):
    s = run_ingest(str(src), str(tmp_path / "cache"), IngestOptions(progress=False), keyer=keyer)
    return s, TokenCache(str(tmp_path / "cache"))


def test_multi_echo_and_multi_b_value_series_are_split(tmp_path, keyer):
    ident = Identity(study_uid=pydicom.uid.generate_uid())
    uid = pydicom.uid.generate_uid()
    for te, name in ((20.0, "e1"), (100.0, "e2")):
        spec = SeriesSpec(modality="MR", series_uid=uid, series_description="AX PD/T2 DE", repetition_time=3500.0,
                          echo_time=te)
        write_phantom_series(str(tmp_path / "src" / "dual"), modality="MR", identity=ident, spec=spec,
                             filenames=[f"{name}_{k}" for k in range(12)], **SMALL)
    uid = pydicom.uid.generate_uid()
    for b, name in ((0.0, "b0"), (1000.0, "b1000")):
        spec = SeriesSpec(modality="MR", series_uid=uid, series_description="AX DWI", repetition_time=5000.0,
                          echo_time=80.0, b_value=b, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"))
        write_phantom_series(str(tmp_path / "src" / "dwi"), modality="MR", identity=ident, spec=spec,
                             filenames=[f"{name}_{k}" for k in range(12)], **SMALL)
    s, c = _ingest(tmp_path / "src", tmp_path, keyer)
    assert s.ingested == 4 and s.failed == 0
    seqs = sorted((e.sequence, e.echo_time_ms, e.b_value) for e in c.series())
    assert ("PD", 20.0, None) in seqs and ("T2", 100.0, None) in seqs
    assert ("DWI", 80.0, 0.0) in seqs and ("DWI", 80.0, 1000.0) in seqs


def test_localizer_mixed_into_a_series_is_split_off_and_skipped(tmp_path, keyer):
    ident = Identity(study_uid=pydicom.uid.generate_uid())
    uid = pydicom.uid.generate_uid()
    write_phantom_series(str(tmp_path / "src" / "s"), "axial", identity=ident,
                         spec=SeriesSpec(series_uid=uid, series_description="HEAD"), filenames=[f"ax{k}" for k in range(12)], **SMALL)
    write_phantom_series(str(tmp_path / "src" / "s"), "sagittal", identity=ident,
                         spec=SeriesSpec(series_uid=uid, series_description="HEAD",
                                         image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
                         filenames=[f"loc{k}" for k in range(3)], n=3, rows=100, cols=96, ps=(2.0, 2.0), step=5.0)
    s, c = _ingest(tmp_path / "src", tmp_path, keyer)
    assert s.ingested == 1
    assert s.reasons[("skipped", "localizer")] == 1
    assert c.series()[0].plane == "axial"


@pytest.mark.parametrize("image_type,sop_class,burned,code", [
    (("DERIVED", "SECONDARY", "MIP"), None, False, "projection"),
    (("ORIGINAL", "PRIMARY", "AXIAL"), None, True, "burned_in"),
    (("ORIGINAL", "PRIMARY", "AXIAL"), "1.2.840.10008.5.1.4.1.1.7", False, "secondary_capture"),
])
def test_policy_skips(tmp_path, keyer, image_type, sop_class, burned, code):
    extra = {"BurnedInAnnotation": "YES"} if burned else {}
    spec = SeriesSpec(image_type=image_type, extra=extra)
    files = write_phantom_series(str(tmp_path / "src" / "s"), spec=spec, **SMALL)
    if sop_class:
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.save_as(f)
    s, _ = _ingest(tmp_path / "src", tmp_path, keyer)
    assert s.ingested == 0 and s.failed == 0
    assert any(c == code for (_, c) in s.reasons), s.reasons


def test_derived_primary_adc_is_kept(tmp_path, keyer):
    spec = SeriesSpec(modality="MR", series_description="ADC", image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
                      repetition_time=5000.0, echo_time=80.0)
    write_phantom_series(str(tmp_path / "src" / "adc"), modality="MR", spec=spec, **SMALL)
    s, c = _ingest(tmp_path / "src", tmp_path, keyer)
    assert s.ingested == 1 and c.series()[0].sequence == "ADC"


@pytest.mark.parametrize("desc,tr,te,ti,agent,expected", [
    ("AX T1 SE", 500, 10, None, "", "T1"),
    ("AX T1 POST GAD", 500, 10, None, "", "T1C"),
    ("sag mprage", 2300, 3, 900, "GADAVIST", "T1C"),
    ("ax t2 tse", 5000, 100, None, "", "T2"),
    ("AX FLAIR", 9000, 120, 2500, "", "FLAIR"),
    ("ax swi", 28, 20, None, "", "SWI"),
    ("", 9000, 110, 2500, "", "FLAIR"),  # no description: from TR/TE/TI
    ("", 4000, 110, None, "", "T2"),
    ("", 450, 12, None, "", "T1"),
    ("", 3000, 15, None, "", "PD"),
    ("localizer-free weird name", None, None, None, "", "other"),
])
def test_mr_sequence_family(desc, tr, te, ti, agent, expected):
    assert mr_sequence(desc.lower(), (), None, tr, te, ti, agent) == expected


def test_mr_sequence_from_coded_values():
    assert mr_sequence("", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), None, None, None, None, "") == "ADC"
    assert mr_sequence("", ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"), 1000, None, None, None, "") == "DWI"
    assert mr_sequence("", (), 1000, 5000, 80, None, "") == "DWI"


@pytest.mark.parametrize("kernel,expected", [
    ("H30s", "soft"), ("H70h", "bone"), ("J70h", "bone"), ("Hr38", "soft"), ("Br64", "bone"),
    ("BONE", "bone"), ("BONEPLUS", "bone"), ("STANDARD", "soft"), ("SOFT", "soft"), ("LUNG", "bone"),
])
def test_ct_kernel_class(kernel, expected):
    assert ct_kernel(kernel, "", None) == expected


def test_ct_flags():
    c = classify("CT", {"_description": "cta head neck", "_kernel": "H20f"}, (), None, None)
    assert c.cta and c.contrast and c.kernel == "soft"
    c = classify("CT", {"_description": "ct head wo contrast", "_kernel": "H30s"}, (), None, None)
    assert not c.contrast and not c.cta
    assert skip_reason(("ORIGINAL", "PRIMARY", "LOCALIZER"), False, "") == ("localizer", "localizer / scout image")
    assert skip_reason(("ORIGINAL", "PRIMARY", "AXIAL"), False, "topogram 0.6 t20f") is not None
    assert skip_reason(("DERIVED", "PRIMARY", "ADC"), False, "adc") is None
