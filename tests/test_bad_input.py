"""Bad input: each problem gets a typed reason in the manifest, the run goes on and exits 0,
nothing already in the cache is lost, and ``--strict`` turns any failure into a non-zero exit."""

from __future__ import annotations

import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from neurovfm.cli import main
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.synth.dicom_writer import Identity
from neurovfm.tokens.cache import TokenCache

from neurovfm.synth.phantom import write_phantom_series


def _small(out, **kw):
    kw.setdefault("n", 12)
    kw.setdefault("rows", 96)
    kw.setdefault("cols", 96)
    kw.setdefault("ps", (2.0, 2.0))
    kw.setdefault("step", 5.0)
    return write_phantom_series(str(out), **kw)


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


@pytest.fixture
def bad_tree(tmp_path):
    src = tmp_path / "src"
    _small(src / "good")
    # a series with one truncated slice (pixel data cut short)
    files = _small(src / "truncated", identity=Identity(study_uid=pydicom.uid.generate_uid()))
    data = open(files[5], "rb").read()
    open(files[5], "wb").write(data[: len(data) - 5000])
    # not DICOM at all, named .dcm; and an empty file without extension
    (src / "junk").mkdir()
    (src / "junk" / "notes.dcm").write_text("this is not a DICOM file")
    (src / "junk" / "EMPTY").write_bytes(b"")
    # a series where one file has no pixel data
    files = _small(src / "nopixels", identity=Identity(study_uid=pydicom.uid.generate_uid()))
    _edit(files[3], PixelData=None)
    # a single slice
    files = _small(src / "single", n=1, identity=Identity(study_uid=pydicom.uid.generate_uid()))
    # zero and absurd dimensions
    files = _small(src / "zero", n=3, identity=Identity(study_uid=pydicom.uid.generate_uid()))
    for f in files:
        _edit(f, Rows=0)
    files = _small(src / "huge", n=3, identity=Identity(study_uid=pydicom.uid.generate_uid()))
    for f in files:
        _edit(f, Rows=60000, Columns=60000)
    # RGB
    files = _small(src / "rgb", n=3, identity=Identity(study_uid=pydicom.uid.generate_uid()))
    for f in files:
        _edit(f, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    # duplicate slice: a different image at an existing position
    files = _small(src / "dup", identity=Identity(study_uid=pydicom.uid.generate_uid()))
    ds = pydicom.dcmread(files[4])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(src / "dup" / "copy_of_4_new_uid.dcm"))
    # missing slices: two removed from the middle
    files = _small(src / "gap", identity=Identity(study_uid=pydicom.uid.generate_uid()))
    os.unlink(files[5])
    os.unlink(files[6])
    # NIfTI with NaN, with a sidecar saying MR
    vol = np.random.default_rng(0).random((64, 64, 20)).astype(np.float32) * 100
    vol[10, 10, 5] = np.nan
    (src / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 5.0, 1.0])), str(src / "nii" / "sub-9_T1w.nii.gz"))
    (src / "nii" / "sub-9_T1w.json").write_text('{"Modality": "MR"}')
    return src


EXPECTED = {
    ("series", "bad_pixel_data"),
    ("file", "not_dicom"),
    ("series", "no_pixel_data"),
    ("series", "single_slice"),
    ("series", "bad_dimensions"),
    ("series", "too_large"),
    ("series", "colour"),
    ("series", "duplicate_slices"),
    ("series", "missing_slices"),
    ("file", "non_finite"),
}


def test_every_problem_has_a_reason_and_the_run_goes_on(bad_tree, tmp_path, keyer):
    cache = tmp_path / "cache"
    summary = run_ingest(str(bad_tree), str(cache), IngestOptions(progress=False), keyer=keyer)
    assert summary.ingested == 1
    rows = list(csv.DictReader(open(cache / "manifest.csv")))
    found = {(r["kind"], r["code"]) for r in rows if r["status"] == "failed"}
    missing = EXPECTED - found
    assert not missing, f"no manifest reason for {missing}; got {found}"
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 and int(ok[0]["n_tokens"]) > 0


def test_a_pool_of_workers_reports_the_same_reasons(bad_tree, tmp_path, keyer):
    """Header reading is spread over worker processes once there are several chunks of files; their
    refusals travel back to the parent (pickled), so one bad file must not break the pool."""
    many = bad_tree / "junk" / "many"
    many.mkdir()
    for i in range(300):  # more files than one chunk of header reading
        (many / f"IM{i:04d}").write_bytes(b"not a DICOM file %d" % i)
    cache = tmp_path / "cache"
    summary = run_ingest(str(bad_tree), str(cache), IngestOptions(progress=False, workers=2), keyer=keyer)
    assert summary.ingested == 1
    rows = list(csv.DictReader(open(cache / "manifest.csv")))
    assert EXPECTED <= {(r["kind"], r["code"]) for r in rows if r["status"] == "failed"}
    junk = [r for r in rows if r["kind"] == "file" and r["code"] == "not_dicom"]
    assert len(junk) >= 301 and all(r["reason"] for r in junk)


def test_cli_exit_codes_and_existing_cache_kept(bad_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "cli-secret")
    cache = tmp_path / "cache"
    good_only = tmp_path / "good_only"
    shutil.copytree(bad_tree / "good", good_only / "good")
    assert main(["ingest", str(good_only), str(cache), "--quiet"]) == 0
    c = TokenCache(str(cache))
    before = {e.series_key: np.array(c.raw(e)[0]) for e in c.series()}
    c.close()
    assert len(before) == 1
    # the bad tree into the same cache: exit 0 without --strict, 1 with it
    assert main(["ingest", str(bad_tree), str(cache), "--quiet"]) == 0
    assert main(["ingest", str(bad_tree), str(cache), "--quiet", "--strict", "--show-paths"]) == 1
    out = capsys.readouterr().out
    assert "missing_slices" in out and "gap" in out  # paths only on the terminal, on request
    c = TokenCache(str(cache))
    after = {e.series_key: np.array(c.raw(e)[0]) for e in c.series()}
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_fatal_errors_exit_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "does-not-exist"), str(tmp_path / "c"), "--quiet"]) == 2
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    (tmp_path / "src").mkdir()
    assert main(["ingest", str(tmp_path / "src"), str(blocker / "cache"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err or "error" in err
    with pytest.raises(SystemExit):
        main(["ingest", str(tmp_path / "src"), str(tmp_path / "c"), "--shard", "3"])
    assert main(["ingest", str(tmp_path / "src"), str(tmp_path / "c"), "--shard", "3/2", "--quiet"]) == 2


def test_nifti_without_modality_is_refused_unless_given(tmp_path, keyer):
    src = tmp_path / "src"
    src.mkdir()
    vol = np.random.default_rng(0).random((80, 80, 24)).astype(np.float32) * 100 + 50
    vol[:10] = 0
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 5.0, 1.0])), str(src / "scan.nii.gz"))
    s = run_ingest(str(src), str(tmp_path / "c1"), IngestOptions(progress=False), keyer=keyer)
    assert s.ingested == 0 and s.reasons[("failed", "unknown_modality")] == 1
    s = run_ingest(str(src), str(tmp_path / "c2"), IngestOptions(progress=False, modality="mr"), keyer=keyer)
    assert s.ingested == 1
