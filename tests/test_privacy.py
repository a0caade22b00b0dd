"""Patient privacy: keyed ids, the allowlist, and the PHI audit that finds planted values."""

from __future__ import annotations

import os
import sqlite3
import stat

import pydicom
import pytest

from neurovfm.cli import main
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.privacy.audit import audit
from neurovfm.privacy.keys import Keyer, load_site_secret, secret_path
from neurovfm.synth.dicom_writer import Identity, SeriesSpec
from neurovfm.tokens.cache import SERIES_COLUMNS

from neurovfm.synth.phantom import write_phantom_series

PHI = Identity(
    patient_name="ZEBULON^QUINTAVIUS^M", patient_id="MRN7391846", birth_date="19480317", sex="M", age="077Y",
    accession="ACC55519834", institution="Saint Hypothetical Medical Center",
    referring_physician="BRACKENRIDGE^OPHELIA", performing_physician="FAIRWEATHER^LUCIUS",
    operator="TECHNOLOGIST^WINIFRED", study_date="20240611", study_description="CT HEAD TRAUMA ZEBULON",
)


@pytest.fixture
def phi_tree(tmp_path):
    src = tmp_path / "src"
    write_phantom_series(str(src / "a"), "axial", n=14, rows=120, cols=110, ps=(1.8, 1.8), step=5.0, identity=PHI,
                         spec=SeriesSpec(series_description="AX HEAD ZEBULON SPECIAL", kernel="H30s",
                                         extra={"DeviceSerialNumber": "SN-88812345", "StationName": "CTSTATION77"}))
    write_phantom_series(str(src / "b"), "sagittal", n=14, rows=120, cols=110, ps=(1.8, 1.8), step=5.0, modality="MR",
                         identity=PHI)
    return src


def test_cache_is_clean_and_planted_value_is_found(phi_tree, tmp_path, keyer):
    cache = tmp_path / "cache"
    s = run_ingest(str(phi_tree), str(cache), IngestOptions(progress=False), keyer=keyer)
    assert s.ingested == 2
    rep = audit(str(cache), str(phi_tree))
    assert rep.needles >= 15 and rep.files_scanned >= 3
    assert rep.clean, rep.hits
    # plant an identifier into a token shard and into the manifest: both must be found
    shard = next(p for p in (cache / "shards").iterdir() if p.suffix == ".bin")
    with open(shard, "ab") as fh:
        fh.write(b"\x00\x01" + PHI.accession.encode() + b"\x02")
    rep = audit(str(cache), str(phi_tree))
    assert [h for h in rep.hits if h[1] == "AccessionNumber"]
    with open(cache / "manifest.csv", "a") as fh:
        fh.write("zebulon,QUINTAVIUS\n")
    rep = audit(str(cache), str(phi_tree))
    assert any("PatientName" in h[1] or h[1].startswith("PN") for h in rep.hits)


def test_audit_cli_exit_codes(phi_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "audit-secret")
    cache = tmp_path / "cache"
    assert main(["ingest", str(phi_tree), str(cache), "--quiet"]) == 0
    assert main(["audit-phi", str(cache), "--source", str(phi_tree)]) == 0
    with open(cache / "index.sqlite", "ab") as fh:
        fh.write(PHI.patient_id.encode())
    assert main(["audit-phi", str(cache), "--source", str(phi_tree)]) == 3


def test_index_holds_only_allowlisted_fields(phi_tree, tmp_path, keyer):
    cache = tmp_path / "cache"
    run_ingest(str(phi_tree), str(cache), IngestOptions(progress=False), keyer=keyer)
    db = sqlite3.connect(str(cache / "index.sqlite"))
    cols = [r[1] for r in db.execute("PRAGMA table_info(series)")]
    assert cols == list(SERIES_COLUMNS)
    rows = db.execute("SELECT * FROM series").fetchall()
    text = " ".join(str(v) for r in rows for v in r)
    for value in (PHI.patient_id, "ZEBULON", PHI.birth_date, PHI.accession, PHI.study_date, "Hypothetical"):
        assert value not in text
    # age capped and kept, sex kept, raw UIDs replaced by keyed hashes
    rec = dict(zip(cols, rows[0]))
    assert rec["age_years"] == 77 and rec["sex"] == "M"
    ds = pydicom.dcmread(next(iter(sorted((phi_tree / "a").iterdir()))))
    assert ds.StudyInstanceUID not in text and ds.SeriesInstanceUID not in text
    assert rec["study_key"] == keyer.study(ds.StudyInstanceUID)
    assert rec["patient_key"] == keyer.patient(PHI.patient_id)
    assert len({r[cols.index("patient_key")] for r in rows}) == 1  # both series: one patient


def test_age_is_capped_at_90(tmp_path, keyer):
    old = Identity(patient_id="OLD1", age="097Y", study_uid=pydicom.uid.generate_uid())
    write_phantom_series(str(tmp_path / "src" / "a"), n=12, rows=96, cols=96, ps=(2.0, 2.0), identity=old)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    db = sqlite3.connect(str(tmp_path / "c" / "index.sqlite"))
    assert db.execute("SELECT age_years FROM series").fetchone()[0] == 90


def test_site_secret_created_once_private_and_reused(tmp_path):
    p = secret_path()
    assert str(tmp_path) in p  # isolated by the autouse fixture
    assert not os.path.exists(p)
    s1 = load_site_secret()
    assert os.path.exists(p) and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert load_site_secret() == s1 and len(s1) >= 32
    os.environ["NEUROVFM_SITE_SECRET"] = "from-env"
    try:
        assert load_site_secret() == b"from-env"
    finally:
        del os.environ["NEUROVFM_SITE_SECRET"]


def test_keys_depend_on_secret_and_kind():
    a, b = Keyer(b"one"), Keyer(b"two")
    assert a.patient("X1") == Keyer(b"one").patient("X1")
    assert a.patient("X1") != b.patient("X1")
    assert a.patient("X1") != a.study("X1")
    assert "X1" not in a.patient("X1") and len(a.patient("X1")) == 20


def test_audit_refuses_missing_folders(tmp_path, capsys):
    """A typo in a path must never read as a clean audit."""
    (tmp_path / "src").mkdir()
    (tmp_path / "notcache").mkdir()
    assert main(["audit-phi", str(tmp_path / "nope"), "--source", str(tmp_path / "src")]) == 2
    assert main(["audit-phi", str(tmp_path / "notcache"), "--source", str(tmp_path / "src")]) == 2
    assert "not a token cache" in capsys.readouterr().err
