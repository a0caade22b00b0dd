"""``neurovfm analyze`` end to end, through the real command line on real files: DICOM studies
of the synthetic archive (one file per slice), hand-made NIfTI studies, worklists and bad input.

The model is small and untrained (tests/analyze_support.py): these tests check the plumbing
(files, geometry, calibration, decisions, triage, warnings, privacy), never what a model learned.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from analyze_support import head_volume, make_model, reorient, write_nifti_study
from neurovfm.eval.calibrate import PlattScaler
from neurovfm.models.folder import read_config, update_config
from neurovfm.synth import tables

ACUITY_RANK = {lv: i for i, lv in enumerate(tables.ACUITY_LEVELS)}  # lower = more urgent


# -- helpers ----------------------------------------------------------------------------------------
def analyze_cli(*args: str, model: str | None, cwd: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "neurovfm", "analyze", *args]
    if model is not None:
        cmd += ["--model", model]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def load_result(out) -> dict:
    with open(os.path.join(out, "result.json")) as fh:
        return json.load(fh)


def codes(result: dict) -> list[str]:
    return [w["code"] for w in result["warnings"]]


def all_files(root) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> (size, mtime_ns))."""
    out = {}
    for dp, _, fns in os.walk(root):
        for f in fns:
            p = os.path.join(dp, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def ct_head_nifti(folder, **sidecar) -> str:
    vol, aff = head_volume(shape=(80, 96, 64), spacing=(2.0, 2.0, 2.5), modality="CT", seed=1)
    return write_nifti_study(str(folder), vol, aff, "CT", name="ct", sidecar=sidecar)


def mr_head_nifti(folder, **sidecar) -> str:
    vol, aff = head_volume(shape=(80, 96, 64), spacing=(2.0, 2.0, 2.5), modality="MR", seed=2)
    return write_nifti_study(str(folder), vol, aff, "MR", name="T1w", sidecar=sidecar)


# -- module fixtures --------------------------------------------------------------------------------
CT_A = np.linspace(0.5, 2.5, 200)  # a non-identity Platt calibration for the CT head (per label)
CT_B = np.linspace(-0.6, 0.4, 200)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("model"))
    make_model(folder)
    # make the CT calibration visible: raw and calibrated probabilities must differ, per label
    heads = read_config(folder)["heads"]
    n = len(heads["head_ct"]["labels"])
    heads["head_ct"]["calibration"] = PlattScaler(CT_A[:n].copy(), CT_B[:n].copy()).to_dict()
    update_config(folder, heads=heads)
    return folder


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """A small synthetic archive (one DICOM file per slice) with at least one CT and one MR study."""
    root = str(tmp_path_factory.mktemp("archive"))
    p = subprocess.run([sys.executable, "-m", "neurovfm", "synth", root, "--studies", "4", "--seed", "0",
                        "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(root, "records.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]

    def study_dir(rec):
        dirs = {os.path.dirname(s["path"]) for s in rec["series"]}
        assert len(dirs) == 1
        return os.path.join(root, dirs.pop())

    ct = [r for r in recs if r["modality"] == "CT"]
    mr = sorted([r for r in recs if r["modality"] == "MR"], key=lambda r: len(r["series"]))
    assert ct and mr, "the archive needs a CT and an MR study; change --studies/--seed"
    return {"root": root, "ct": study_dir(ct[0]), "mr": study_dir(mr[0]), "ct_record": ct[0]}


@pytest.fixture(scope="module")
def ct_run(archive, model, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("ct_out") / "out")
    p = ok(analyze_cli(archive["ct"], "--out", out, "--quiet", model=model))
    return {"out": out, "proc": p, "result": load_result(out)}


# -- 1. a DICOM study ---------------------------------------------------------------------------------
def test_dicom_ct_study(ct_run, archive, model):
    res, out = ct_run["result"], ct_run["out"]
    assert res["format"] == "neurovfm-result"
    assert [e["modality"] for e in res["exams"]] == ["CT"]
    ex = res["exams"][0]
    # the archive's CT study: every DICOM series is one series of the exam
    assert len(ex["series"]) == len(archive["ct_record"]["series"])
    assert ex["n_tokens"] == sum(s["n_tokens"] for s in ex["series"]) > 0
    assert "body_part" not in codes(res)  # a real head: no body-part warning

    names = tables.label_names("CT")
    rows = ex["labels"]
    assert sorted(r["label"] for r in rows) == sorted(names)  # every label exactly once
    cfg = read_config(model)["heads"]["head_ct"]
    a = dict(zip(cfg["labels"], cfg["calibration"]["a"]))
    b = dict(zip(cfg["labels"], cfg["calibration"]["b"]))
    for r in rows:
        p, q, t = r["probability"], r["calibrated_probability"], r["threshold"]
        assert 0.0 <= p <= 1.0 and 0.0 <= q <= 1.0
        # the stored calibration is the one applied: q = sigmoid(a * logit(p) + b)
        z = np.log(p / (1 - p))
        assert q == pytest.approx(1 / (1 + np.exp(-(a[r["label"]] * z + b[r["label"]]))), abs=2e-4)
        assert t == pytest.approx(cfg["thresholds"][r["label"]], abs=1e-5)  # the saved operating point
        assert r["decision"] == (q >= t)
        assert r["acuity"] == tables.acuity("CT", r["label"])
        assert r["side"] in ("left", "right", "bilateral", "midline", "unknown")
    assert any(abs(r["probability"] - r["calibrated_probability"]) > 0.01 for r in rows)
    positive = [r["label"] for r in rows if r["decision"]]
    assert sorted(ex["findings"]) == sorted(positive)

    level = ex["triage"]["level"]
    assert level in ("Urgent", "Routine", "Normal")
    expect = min((tables.acuity("CT", lab) for lab in positive), key=ACUITY_RANK.__getitem__, default="Normal")
    assert level == expect
    if level == "Normal":
        assert ex["triage"]["drivers"] == []
    else:
        assert sorted(ex["triage"]["drivers"]) == sorted(lab for lab in positive if tables.acuity("CT", lab) == level)

    # maps: exactly the top-3 labels by calibrated probability, one NIfTI per series, on the series' grid
    mapped = [r for r in rows if r["maps"]]
    assert len(mapped) == 3
    assert min(r["calibrated_probability"] for r in mapped) >= max(
        r["calibrated_probability"] for r in rows if not r["maps"])
    dicom_files = {s["path"]: len(os.listdir(os.path.join(archive["root"], s["path"])))
                   for s in archive["ct_record"]["series"]}
    for s in ex["series"]:
        img = nib.load(os.path.join(out, s["image"]))
        assert img.shape[2] in dicom_files.values()  # the native slices, one per DICOM file
        image = np.asarray(img.dataobj, np.float32)
        assert image.min() < -900 and image.max() > 50  # Hounsfield units: air and head
        for r in mapped:
            fn = r["maps"]["nifti"][s["name"]]
            assert fn == f"{s['name']}_map_{r['label']}.nii.gz"
            m = nib.load(os.path.join(out, fn))
            assert m.shape == img.shape
            np.testing.assert_allclose(m.affine, img.affine, atol=1e-6)
            v = m.get_fdata()
            assert v.min() >= 0.0 and v.max() <= 1.0 + 1e-6
            assert v.max() > 0.5  # scaled to its peak: not an empty map
            # the map lies over the head, not the air around it (map and image share voxels)
            assert (v * (image > -300)).sum() / v.sum() > 0.9
    for r in mapped:
        assert os.path.isfile(os.path.join(out, r["maps"]["png"]))
    with open(os.path.join(out, "summary.html"), encoding="utf-8") as fh:
        html = fh.read()
    assert "Not a medical device" in html
    assert level in html


# -- 2. NIfTI studies -----------------------------------------------------------------------------------
def test_nifti_with_sidecar(tmp_path, model):
    vol, aff = head_volume(modality="MR")
    vol, aff = reorient(vol, aff, "sagittal")  # stored in a non-RAS voxel order
    src = write_nifti_study(str(tmp_path / "study"), vol, aff, "MR")
    out = tmp_path / "out"
    ok(analyze_cli(str(tmp_path / "study"), "--out", str(out), "--top-k", "1", "--quiet", model=model))
    res = load_result(out)
    assert [e["modality"] for e in res["exams"]] == ["MR"]
    ex = res["exams"][0]
    assert sorted(r["label"] for r in ex["labels"]) == sorted(tables.label_names("MR"))
    assert "pediatric" not in codes(res) and "body_part" not in codes(res)
    # the image written is the original scan: same voxels, same affine
    img = nib.load(os.path.join(out, ex["series"][0]["image"]))
    assert img.shape == vol.shape
    np.testing.assert_allclose(img.affine, nib.load(src).affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.dataobj, np.float32), vol, atol=1e-3)
    assert sum(1 for r in ex["labels"] if r["maps"]) == 1  # --top-k 1



def test_top_k_maps_skip_labels_without_an_operating_point(tmp_path, model):
    """A label with no validation positives has no operating point and an uncalibrated probability
    (an untrained output near 0.5 can top the list): top-k maps rank only labels with one; --maps all
    still draws it; summary.html lists it after the others, greyed, and says why."""
    from neurovfm.analyze.pipeline import map_labels

    labels = ["a", "b", "c", "d"]
    p = np.array([0.9, 0.3, 0.8, 0.5])
    thr = {"a": None, "b": 0.2, "c": 0.5, "d": float("inf")}
    assert map_labels(labels, p, thr, 2) == ["c", "b"]
    assert map_labels(labels, p, thr, None) == ["a", "c", "d", "b"]
    assert map_labels(labels, p, {}, 2) == ["a", "c"]  # no operating point at all: plain ranking
    folder = str(tmp_path / "m")
    shutil.copytree(model, folder)
    heads = read_config(folder)["heads"]
    meta = heads["head_mr"]
    n = len(meta["labels"])
    top = meta["labels"][5]
    a, b = np.ones(n), np.zeros(n)
    a[5], b[5] = 0.0, 8.0  # calibrated probability ~1 for this label, whatever the study
    meta["calibration"] = PlattScaler(a, b).to_dict()
    meta["thresholds"][top] = None
    update_config(folder, heads=heads)
    vol, aff = head_volume(modality="MR")
    write_nifti_study(str(tmp_path / "study"), vol, aff, "MR")
    out = tmp_path / "out"
    ok(analyze_cli(str(tmp_path / "study"), "--out", str(out), "--top-k", "2", "--quiet", model=folder))
    rows = load_result(out)["exams"][0]["labels"]
    best = max(rows, key=lambda r: r["calibrated_probability"])
    assert best["label"] == top and best["threshold"] is None and not best["decision"]
    mapped = [r for r in rows if r["maps"]]
    assert len(mapped) == 2 and top not in {r["label"] for r in mapped}
    # result.json lists labels with an operating point first (most probable first), then the others
    have = [r["threshold"] is not None for r in rows]
    assert have == sorted(have, reverse=True) and rows[0]["label"] != top
    first = [r["calibrated_probability"] for r in rows if r["threshold"] is not None]
    assert first == sorted(first, reverse=True)
    assert all(r["threshold"] is not None for r in mapped)
    html = (out / "summary.html").read_text()
    assert "Greyed" in html and html.index(f"<td>{top}</td>") > max(html.index(f"<td>{r['label']}</td>") for r in mapped)
    out_all = tmp_path / "out_all"
    ok(analyze_cli(str(tmp_path / "study"), "--out", str(out_all), "--maps", "all", "--quiet", model=folder))
    assert all(r["maps"] for r in load_result(out_all)["exams"][0]["labels"])

def test_nifti_without_sidecar(tmp_path, model):
    vol, aff = head_volume(shape=(80, 96, 64), spacing=(2.0, 2.0, 2.5), modality="MR")
    os.makedirs(tmp_path / "study")
    path = str(tmp_path / "study" / "scan.nii.gz")
    nib.save(nib.Nifti1Image(vol, aff), path)

    out1 = tmp_path / "out1"
    ok(analyze_cli(path, "--out", str(out1), "--maps", "none", "--quiet", model=model))
    res = load_result(out1)
    assert res["exams"] == []
    assert "series_refused" in codes(res) and "no_series" in codes(res)

    out2 = tmp_path / "out2"
    ok(analyze_cli(path, "--out", str(out2), "--modality", "mr", "--maps", "none", "--quiet", model=model))
    res = load_result(out2)
    assert [e["modality"] for e in res["exams"]] == ["MR"]
    assert "no_series" not in codes(res) and "series_refused" not in codes(res)
    assert "unknown_sequence" in codes(res)  # no header tells the sequence: said, not hidden


# -- 3. CT and MR in one folder ---------------------------------------------------------------------------
def test_mixed_ct_mr_folder(tmp_path, archive, model):
    mixed = tmp_path / "mixed"
    shutil.copytree(archive["ct"], mixed / "a")
    shutil.copytree(archive["mr"], mixed / "b")
    out = tmp_path / "out"
    ok(analyze_cli(str(mixed), "--out", str(out), "--top-k", "1", "--quiet", model=model))
    res = load_result(out)
    assert sorted(e["modality"] for e in res["exams"]) == ["CT", "MR"]
    for ex in res["exams"]:
        assert {r["label"] for r in ex["labels"]} == set(tables.label_names(ex["modality"]))
        assert all(s["name"].split("_")[1] == ex["modality"] for s in ex["series"])
        for s in ex["series"]:
            assert os.path.isfile(os.path.join(out, s["image"]))
    n_series = {e["modality"]: len(e["series"]) for e in res["exams"]}
    assert n_series["MR"] >= 2 and n_series["CT"] >= 1
    names = [s["name"] for e in res["exams"] for s in e["series"]]
    assert len(set(names)) == len(names)  # no series overwrites another's files


# -- 4. not a head ---------------------------------------------------------------------------------------
def test_chest_ct_warns_body_part(tmp_path, model):
    shape, sp = (180, 130, 30), (2.0, 2.0, 5.0)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -np.array(shape) * np.array(sp) / 2
    x = np.arange(shape[0])[:, None] * sp[0] + aff[0, 3]
    y = np.arange(shape[1])[None, :] * sp[1] + aff[1, 3]
    torso = (x / 170.0) ** 2 + (y / 120.0) ** 2 <= 1  # 340 x 240 mm
    vol = np.full(shape, -1000.0, np.float32)
    vol[torso] = 40.0
    write_nifti_study(str(tmp_path / "chest"), vol, aff, "CT", name="ct",
                      sidecar={"Modality": "CT", "BodyPartExamined": "CHEST"})
    out = tmp_path / "out"
    ok(analyze_cli(str(tmp_path / "chest"), "--out", str(out), "--maps", "none", "--quiet", model=model))
    res = load_result(out)
    assert [e["modality"] for e in res["exams"]] == ["CT"]  # analysed, but never silently
    bp = [w for w in res["warnings"] if w["code"] == "body_part"]
    assert any("CHEST" in w["message"] for w in bp)  # from the header
    assert any("mm wide" in w["message"] for w in bp)  # and from the image itself (~340 mm)
    assert res["exams"][0]["series"][0]["warnings"].count("body_part") == 2


def test_head_ct_nifti_no_body_part_warning(tmp_path, model):
    """Control for the chest: a head CT NIfTI (no BodyPartExamined) is not flagged, and its
    measured left-right width is a head's."""
    ct_head_nifti(tmp_path / "head")
    out = tmp_path / "out"
    ok(analyze_cli(str(tmp_path / "head"), "--out", str(out), "--maps", "none", "--quiet", model=model))
    res = load_result(out)
    assert [e["modality"] for e in res["exams"]] == ["CT"]
    assert "body_part" not in codes(res)
    assert 130 <= res["exams"][0]["series"][0]["midplane"]["head_width_mm"] <= 190


# -- 5. junk among the slices ------------------------------------------------------------------------------
def test_junk_files_refused_not_fatal(tmp_path, archive, model, ct_run):
    study = tmp_path / "study"
    shutil.copytree(archive["ct"], study)
    series_dir = study / sorted(os.listdir(study))[0]
    rng = np.random.default_rng(0)
    (series_dir / "junk.dcm").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (series_dir / "empty").write_bytes(b"")
    (series_dir / "notes.txt").write_text("the technologist's notes\n")

    out = tmp_path / "out"
    p = ok(analyze_cli(str(study), "--out", str(out), "--maps", "none", "--quiet", model=model))
    res = load_result(out)
    assert [e["modality"] for e in res["exams"]] == ["CT"]
    assert res["exams"][0]["n_tokens"] == ct_run["result"]["exams"][0]["n_tokens"]  # same series, same tokens
    assert codes(res).count("file_refused") >= 1
    assert "junk" not in p.stderr  # paths only on request

    out2 = tmp_path / "out2"
    p = ok(analyze_cli(str(study), "--out", str(out2), "--maps", "none", "--show-paths", "--quiet", model=model))
    assert "junk.dcm" in p.stderr
    res2 = load_result(out2)
    assert "file_refused" in codes(res2)
    for fn in ("result.json", "summary.html"):
        with open(os.path.join(out2, fn), encoding="utf-8") as fh:
            text = fh.read()
        assert "junk" not in text and "notes" not in text and str(tmp_path) not in text


# -- 6. a child -------------------------------------------------------------------------------------------
def test_pediatric_warning(tmp_path, model):
    mr_head_nifti(tmp_path / "study", PatientAge=8)
    out = tmp_path / "out"
    ok(analyze_cli(str(tmp_path / "study"), "--out", str(out), "--maps", "none", "--quiet", model=model))
    res = load_result(out)
    assert [e["modality"] for e in res["exams"]] == ["MR"]
    assert "pediatric" in codes(res)
    assert "pediatric" in res["exams"][0]["series"][0]["warnings"]


# -- 7. privacy ---------------------------------------------------------------------------------------------
def test_no_identifiers_in_output(ct_run, archive):
    out = ct_run["out"]
    series_dir = os.path.join(archive["root"], archive["ct_record"]["series"][0]["path"])
    first = sorted(os.listdir(series_dir))[0]
    ds = pydicom.dcmread(os.path.join(series_dir, first), stop_before_pixels=True)
    needles = {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.PatientBirthDate),
               str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    needles |= {part for part in str(ds.PatientName).split("^") if len(part) >= 4}
    needles = {n for n in needles if len(n) >= 4}
    assert len(needles) >= 6
    files = [os.path.join(dp, f) for dp, _, fns in os.walk(out) for f in fns]
    assert any(f.endswith(".nii.gz") for f in files) and any(f.endswith(".png") for f in files)
    for f in files:
        with open(f, "rb") as fh:
            blobs = [fh.read()]
        if f.endswith(".gz"):
            blobs.append(gzip.decompress(blobs[0]))
        for blob in blobs:
            for n in needles:
                assert n.encode() not in blob, f"{os.path.basename(f)} holds an identifying value"
    # no part of the input path either (folder names may carry a patient's id or name)
    rel = os.path.relpath(archive["ct"], archive["root"])
    parts = [p for p in rel.split(os.sep) if p and p != "dicom"]  # P0000n / S0000n (the archive's own "dicom" is generic)
    parts += [os.path.basename(archive["root"]), first.split(".")[0]]
    assert any(p.startswith("P") for p in parts)
    for fn in ("result.json", "summary.html"):
        with open(os.path.join(out, fn), encoding="utf-8") as fh:
            text = fh.read()
        for part in parts:
            assert part not in text, f"{fn} names the input path component {part!r}"
    assert archive["ct_record"]["patient_id"] not in ct_run["proc"].stdout


# -- 8. worklists ---------------------------------------------------------------------------------------------
def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_worklist_file(tmp_path, archive, model):
    wl = tmp_path / "wl"
    mr_head_nifti(wl / "studies" / "mr_one")
    lst = wl / "list.txt"
    lst.write_text(f"# two studies\n{archive['ct']}\n\nstudies/mr_one\nstudies/not_there_P99\n")
    out = tmp_path / "out"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()  # a relative path is relative to the list file, not the working directory
    p = ok(analyze_cli("--list", str(lst), "--out", str(out), "--maps", "none", "--quiet", model=model,
                       cwd=str(elsewhere)))
    assert "worklist.csv" in p.stdout
    rows = read_csv(out / "worklist.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert [r["folder"] for r in rows[:2]] == ["study0001", "study0002"]
    assert [r["modalities"] for r in rows[:2]] == ["CT", "MR"]
    for r in rows[:2]:
        res = load_result(out / r["folder"])
        assert r["triage"] == res["exams"][0]["triage"]["level"]
    assert not (out / "study0003" / "result.json").exists()
    with open(out / "worklist.csv") as fh:
        text = fh.read()
    assert "not_there_P99" not in text and "P0000" not in text  # no input path in the table


def test_worklist_folder(tmp_path, model):
    ct_head_nifti(tmp_path / "studies" / "a_first")
    mr_head_nifti(tmp_path / "studies" / "b_second")
    (tmp_path / "studies" / "readme.txt").write_text("not a study\n")
    out = tmp_path / "out"
    ok(analyze_cli("--list", str(tmp_path / "studies"), "--out", str(out), "--maps", "none", "--quiet", model=model))
    rows = read_csv(out / "worklist.csv")
    assert [(r["item"], r["folder"], r["status"], r["modalities"]) for r in rows] == [
        ("1", "study0001", "ok", "CT"), ("2", "study0002", "ok", "MR")]
    assert sorted(os.listdir(out)) == ["study0001", "study0002", "worklist.csv"]
    assert [e["modality"] for e in load_result(out / "study0002")["exams"]] == ["MR"]


# -- 9. bad input --------------------------------------------------------------------------------------------------
def test_bad_input(tmp_path, model):
    missing = str(tmp_path / "no_such_study")
    p = analyze_cli(missing, "--out", str(tmp_path / "o1"), model=model)
    assert p.returncode == 2
    assert missing in p.stderr and "Traceback" not in p.stderr

    p = analyze_cli("--out", str(tmp_path / "o2"), model=model)
    assert p.returncode == 2
    assert "STUDY" in p.stderr and "--list" in p.stderr and "Traceback" not in p.stderr

    p = analyze_cli(str(tmp_path), "--list", str(tmp_path), "--out", str(tmp_path / "o3"), model=model)
    assert p.returncode == 2  # both given: also an error

    no_heads = str(tmp_path / "encoder_only")
    r = subprocess.run([sys.executable, "-m", "neurovfm", "init-model", no_heads, "--size", "tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    study = mr_head_nifti(tmp_path / "study")
    p = analyze_cli(study, "--out", str(tmp_path / "o4"), model=no_heads)
    assert p.returncode == 2
    assert "heads" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "o4" / "result.json")


# -- 10. nothing written outside OUT (Python API) ------------------------------------------------------------------
def test_nothing_written_outside_out(tmp_path, model, monkeypatch):
    from neurovfm.analyze.pipeline import analyze

    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show up below
    study = tmp_path / "study"
    mr_head_nifti(study, PatientAge=40)
    before_tmp, before_study, before_model = all_files(tmp_path), all_files(study), all_files(model)
    out = tmp_path / "out"
    res = analyze(str(study), str(out), model=model)
    assert [e["modality"] for e in res["exams"]] == ["MR"]
    assert all_files(study) == before_study
    assert all_files(model) == before_model
    after = all_files(tmp_path)
    changed = {k for k in after if before_tmp.get(k) != after[k]} | (set(before_tmp) - set(after))
    assert changed and all(k.startswith("out" + os.sep) for k in changed), sorted(changed)
    written = {os.path.relpath(k, "out") for k in changed}
    assert {"result.json", "summary.html"} <= written
    assert not any(k.endswith(".part") or ".part." in k for k in written)  # no temporary leftovers


def test_each_dicom_file_is_decoded_once(archive, model, tmp_path, monkeypatch):
    """analyze maps back onto the native grid with the pixels ingestion decoded, not a second read."""
    from neurovfm.analyze.pipeline import Analyzer
    from neurovfm.ingest.dicom_series import DicomStack

    calls: dict[str, int] = {}
    real = DicomStack._decode

    def counting(self, path):
        calls[path] = calls.get(path, 0) + 1
        return real(self, path)

    monkeypatch.setattr(DicomStack, "_decode", counting)
    Analyzer(model).run(archive["ct"], str(tmp_path / "out"))
    n_files = sum(len(files) for _, _, files in os.walk(archive["ct"]))
    assert len(calls) == n_files and set(calls.values()) == {1}, sorted(set(calls.values()))


def _summed_over_views(group, per_token):
    """Per series, rows of a study-level per-token array [all views' tokens, C] summed over that
    series' views (CT windows), in the encoder's order: series by series, view by view."""
    from neurovfm.ingest.policy import DEFAULT_POLICY
    from neurovfm.tokens.cache import as_views

    out, start = [], 0
    for s in group:
        n_views = as_views(s.ts.tokens, s.ts.storage, s.ts.views, DEFAULT_POLICY)[0].shape[1]
        out.append(sum(per_token[start + v * s.ts.n_tokens: start + (v + 1) * s.ts.n_tokens] for v in range(n_views)))
        start += n_views * s.ts.n_tokens
    assert start == len(per_token)
    return out


@pytest.mark.parametrize("source", ["contribution", "token"])
def test_other_map_sources_share_one_encoding(archive, model, source):
    """``--map-source contribution``: per class the positive part of each token's exact share of
    the logit; ``token``: each token's own probability of the finding from the head's token
    classifier (what lesion masks train). Both normalised over the study, summed over a series'
    CT windows, from the same encoder features as the attention maps, with the same probabilities."""
    import torch

    from neurovfm.analyze.pipeline import Analyzer, read_study
    from neurovfm.eval.calibrate import sigmoid
    from neurovfm.probe.heads import token_contributions, token_logits

    an = Analyzer(model)
    group, _ = read_study(archive["ct"], an.cfg)
    att = an.score("CT", group)
    other = an.score("CT", group, view_features=att.view_features, map_source=source)
    np.testing.assert_allclose(other.p_cal, att.p_cal, atol=1e-9)
    head, bag = an.heads["CT"][0], torch.from_numpy(np.concatenate(att.view_features).astype(np.float32))
    with torch.no_grad():
        if source == "contribution":
            w = np.clip(token_contributions(head, bag, torch.tensor([0, len(bag)])).double().numpy(), 0, None)
        else:
            w = sigmoid(token_logits(head, bag).double().numpy())
    w = w / np.where(w.sum(0) > 0, w.sum(0), 1)
    for w_att, w_other, expect in zip(att.per_series_w, other.per_series_w, _summed_over_views(group, w)):
        np.testing.assert_allclose(w_other, expect, atol=1e-6)
        assert not np.allclose(w_other, w_att)  # a different map, not attention renamed
    total = sum(w.sum(0) for w in other.per_series_w)
    assert np.all((np.abs(total - 1) < 1e-6) | (total == 0))  # a distribution, or nothing pushed the logit up
    if source == "token":
        np.testing.assert_allclose(total, 1.0, atol=1e-6)  # a probability is never zero


def test_token_maps_of_a_mean_head_are_refused(archive, model):
    from neurovfm.analyze.pipeline import AnalyzeError, Analyzer, read_study
    from neurovfm.probe.heads import HeadConfig, build_head, head_input_dim

    an = Analyzer(model)
    head, meta = an.heads["CT"]
    an.heads["CT"] = (build_head(HeadConfig(kind="mean"), head_input_dim(head), len(meta["labels"])).eval(),
                      {**meta, "head": {**meta["head"], "kind": "mean"}, "calibration": None})
    group, _ = read_study(archive["ct"], an.cfg)
    with pytest.raises(AnalyzeError, match="CT head \\(mean\\) has no token classifier"):
        an.score("CT", group, map_source="token")
    assert an.score("CT", group, map_source="head").p_cal.shape == (len(meta["labels"]),)


def test_token_maps_of_a_mean_head_are_refused_before_any_study_is_read(archive, model, tmp_path, monkeypatch):
    """analyze and pointing refuse up front (the model folder names the head kind), not after
    ingesting and encoding a study."""
    import shutil

    import neurovfm.explain.pointing as pointing_mod
    from neurovfm.analyze.config import AnalyzeConfig
    from neurovfm.analyze.pipeline import AnalyzeError, Analyzer
    from neurovfm.explain.pointing import PointingConfig, run_pointing
    from neurovfm.probe.heads import HeadConfig, build_head
    from neurovfm.probe.train import save_head

    folder = str(tmp_path / "mean_model")
    shutil.copytree(model, folder)
    meta = read_config(folder)["heads"]["head_mr"]
    save_head(folder, build_head(HeadConfig(kind="mean"), meta["dim"], len(meta["labels"])), HeadConfig(kind="mean"),
              meta["labels"], name="head_mr", features=meta.get("features"))
    with pytest.raises(AnalyzeError, match="MR head \\(mean\\) has no token classifier"):
        Analyzer(folder, AnalyzeConfig(map_source="token"))
    for src in ("head", "contribution"):
        Analyzer(folder, AnalyzeConfig(map_source=src)).check_map_source(src)

    def no_reading(*a, **k):
        raise AssertionError("a study was read before the refusal")

    monkeypatch.setattr(pointing_mod, "read_study", no_reading)
    with pytest.raises(AnalyzeError, match="MR head \\(mean\\)"):
        run_pointing(archive["root"], folder, str(tmp_path / "p"), PointingConfig(map_sources=("head", "token")),
                     progress=False)
    assert not os.path.exists(tmp_path / "p")
    p = analyze_cli(archive["ct"], "--out", str(tmp_path / "a"), "--map-source", "token", "--quiet", model=folder)
    assert p.returncode != 0 and "has no token classifier" in p.stderr
    assert not os.path.exists(tmp_path / "a" / "result.json")
