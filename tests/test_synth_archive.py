"""The synthetic archive end to end: plan, render, ingest with no failure, masks on lesions,
sides preserved through ingestion, ground truth re-keyed to join the cache, no PHI in it."""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from neurovfm.ingest.dicom_headers import read_header
from neurovfm.ingest.dicom_series import build_stack, group_records
from neurovfm.ingest.geometry import LAYOUT, StackGeometry, canonicalize
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.ingest.policy import DEFAULT_POLICY, PreprocessPolicy
from neurovfm.privacy.audit import audit
from neurovfm.privacy.keys import Keyer
from neurovfm.synth.archive import plan_archive, write_archive
from neurovfm.synth.rekey import rekey_archive
from neurovfm.synth.tables import label_names
from neurovfm.tokens.cache import TokenCache

N_STUDIES = 8
SEED = 123


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("archive")
    summary = write_archive(str(out), N_STUDIES, SEED, workers=2, progress=False)
    return str(out), summary


@pytest.fixture(scope="module")
def cache(archive, tmp_path_factory):
    out, _ = archive
    c = tmp_path_factory.mktemp("cache")
    keyer = Keyer(b"synth-test")
    s = run_ingest(os.path.join(out, "dicom"), str(c), IngestOptions(progress=False, workers=2), keyer=keyer)
    return str(c), s, keyer


def _records(out):
    with open(os.path.join(out, "findings.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_plan_is_deterministic_and_split_by_patient():
    a, b = plan_archive(60, 7), plan_archive(60, 7)
    assert [vars(p) for p in a] == [vars(p) for p in b]
    assert [vars(p) for p in plan_archive(60, 8)] != [vars(p) for p in a]
    split_of = {}
    for p in a:
        assert split_of.setdefault(p.patient, p.split) == p.split  # never split a patient
    both = [pt for pt in {p.patient for p in a} if {q.modality for q in a if q.patient == pt} == {"CT", "MR"}]
    assert both, "some patients have both a CT and an MRI study"


def test_ground_truth_files(archive):
    out, summary = archive
    recs = _records(out)
    assert len(recs) == N_STUDIES
    with open(os.path.join(out, "labels.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_STUDIES
    n_svd = 0
    for r, rec in zip(rows, recs):
        own = set(label_names(rec["modality"]))
        for lab in rec["labels"]:
            assert lab in own and r[lab] == "1"
        assert rec["indication"] and rec["report"]["findings"] and rec["triage"] in ("Urgent", "Routine", "Normal")
        for f in rec["findings"]:
            assert f["side"] in ("left", "right", "bilateral", "midline")
            if f["family"] == "svd":  # the drawn grade reaches the ground truth and the report's wording
                n_svd += 1
                assert f["degree"] == {1: "mild", 2: "moderate", 3: "extensive"}[f["fazekas"]]
                report = " ".join(rec["report"].values()).lower()
                assert f["degree"] in report
        for s in rec["series"]:
            assert os.path.exists(os.path.join(out, s["mask"]))
    assert n_svd > 0  # the seed plans small vessel disease in 4 of the 8 studies
    mods = {rec["modality"] for rec in recs}
    assert mods == {"CT", "MR"}
    for f in ("label_acuity.csv", "ct_mri_labels.csv", "headline_labels.txt"):
        assert os.path.exists(os.path.join(out, "tables", f))


def test_ingest_round_trip_has_no_failure(archive, cache):
    out, _ = archive
    _, summary, _ = cache
    n_series = sum(len(r["series"]) for r in _records(out))
    assert summary.failed == 0 and summary.skipped == 0, summary.reasons
    assert summary.ingested == n_series


@dataclass
class _Planes:
    data: np.ndarray
    geometry: StackGeometry

    def plane(self, k):
        return self.data[:, :, k].astype(np.float32)


def _canonical_mask(series_dir, mask_path, index):
    recs = [r for f in sorted(glob.glob(os.path.join(series_dir, "*"))) for r in read_header(f)]
    stack = build_stack(group_records(recs)[0], DEFAULT_POLICY)
    m = np.asarray(nib.load(mask_path).dataobj)  # [i, j, k] in writing order (increasing along the normal)
    src = _Planes((m == index).astype(np.float32), stack.geometry)
    return canonicalize(src, PreprocessPolicy(spline_order=1)), canonicalize(stack, DEFAULT_POLICY)


def test_masks_land_on_lesions_and_sides_survive(archive, cache):
    out, _ = archive
    checked_hu = checked_side = 0
    for rec in _records(out):
        for s in rec["series"]:
            if rec["modality"] == "CT" and s["kind"] != "soft":
                continue
            for f in rec["findings"]:
                if f["family"] not in ("iph", "sdh_acute", "edh", "infarct_acute", "glioma", "meningioma", "sdh_chronic"):
                    continue
                cm, cv = _canonical_mask(os.path.join(out, s["path"]), os.path.join(out, s["mask"]), f["mask_index"])
                inside = cm.data > 0.5
                if inside.sum() < 20:
                    continue
                if rec["modality"] == "CT" and f["family"] in ("iph", "sdh_acute", "edh"):
                    # the mask sits on blood: hyperdense against the tissue right around it
                    near = ndimage.binary_dilation(inside, iterations=4) & ~ndimage.binary_dilation(inside, iterations=1)
                    near &= (cv.data > 0) & (cv.data < 100)
                    contrast = np.median(cv.data[inside]) - np.median(cv.data[near])
                    assert contrast > 6, (f, contrast)
                    if f["size_mm"] >= 12:
                        assert np.median(cv.data[inside]) > 50, (f, np.median(cv.data[inside]))
                    checked_hu += 1
                if f["side"] in ("left", "right"):
                    # head midline: centre of the foreground along the left-right grid axis
                    lr = LAYOUT[cv.slice_axis].index(0)
                    fg = np.argwhere(cv.data > (-500 if rec["modality"] == "CT" else np.percentile(cv.data, 40)))
                    mid = fg[:, lr].mean()
                    c = np.argwhere(inside)[:, lr].mean()
                    if abs(c - mid) * abs(cv.affine[0, lr]) < 8:
                        continue
                    # x grows toward the patient's right: left lesions have the lower index
                    assert (c < mid) == (f["side"] == "left"), (rec["modality"], s["plane"], f)
                    checked_side += 1
    assert checked_side >= 3
    assert checked_hu >= 1 or not any(f["family"] in ("iph", "sdh_acute", "edh") for r in _records(out)
                                      if r["modality"] == "CT" for f in r["findings"])


def test_rekeyed_ground_truth_joins_the_cache(archive, cache, tmp_path):
    out, _ = archive
    cdir, _, keyer = cache
    labels, findings = rekey_archive(out, str(tmp_path), keyer)
    text = open(labels).read() + open(findings).read()
    for rec in _records(out):
        assert rec["study_uid"] not in text and rec["patient_id"] not in text
        for s in rec["series"]:
            assert s["series_uid"] not in text
    c = TokenCache(cdir)
    cache_studies = {e.study_key for e in c.series()}
    cache_series = {e.series_key for e in c.series()}
    with open(labels, newline="") as fh:
        keyed = list(csv.DictReader(fh))
    assert {r["study_key"] for r in keyed} == cache_studies
    with open(findings) as fh:
        for line in fh:
            for s in json.loads(line)["series"]:
                assert s["series_key"] in cache_series


def test_cache_from_archive_passes_phi_audit(archive, cache):
    out, _ = archive
    cdir, _, _ = cache
    rep = audit(cdir, os.path.join(out, "dicom"))
    assert rep.needles > 20 and rep.clean, rep.hits


def test_resume_renders_nothing_twice(archive):
    out, _ = archive
    before = open(os.path.join(out, "records.jsonl")).read()
    write_archive(out, N_STUDIES, SEED, workers=1, progress=False)
    assert open(os.path.join(out, "records.jsonl")).read() == before


def test_rendering_is_deterministic_per_seed(tmp_path):
    """The same plan renders to the same pixels and masks (MR: also the per-head artefacts)."""
    from neurovfm.synth.archive import render_study

    plan = next(p for p in plan_archive(N_STUDIES, SEED) if p.modality == "MR")
    recs = [render_study(plan, str(tmp_path / name), SEED) for name in ("a", "b")]
    assert recs[0] == recs[1]
    for s in recs[0]["series"][:3]:
        files = sorted(os.listdir(tmp_path / "a" / s["path"]))
        for f in files[:: max(len(files) // 4, 1)]:
            pa = pydicom.dcmread(tmp_path / "a" / s["path"] / f).pixel_array
            pb = pydicom.dcmread(tmp_path / "b" / s["path"] / f).pixel_array
            np.testing.assert_array_equal(pa, pb)
        ma = np.asarray(nib.load(tmp_path / "a" / s["mask"]).dataobj)
        mb = np.asarray(nib.load(tmp_path / "b" / s["mask"]).dataobj)
        np.testing.assert_array_equal(ma, mb)


def test_anatomy_maps_line_up_with_the_scans(archive, cache):
    """Each study's anatomy map is in the scanner frame of its series: tokens whose centre the map
    calls bone are bright in the CT bone window, white-matter tokens are not; AAL3's left regions
    lie on the patient's left (lower RAS x) of its right ones; the legend names every code."""
    from neurovfm.eval.anatomy import token_codes
    from neurovfm.synth.atlas_maps import TISSUE_CODES, read_legend

    out, _ = archive
    cdir, _, keyer = cache
    legend = read_legend(os.path.join(out, "tables", "anatomy_labels.csv"))
    c = TokenCache(cdir)
    by_study: dict[str, list] = {}
    for e in c.series():
        by_study.setdefault(e.study_key, []).append(e)
    bone_tok, wm_tok = [], []
    for rec in _records(out):
        img = nib.load(os.path.join(out, rec["anatomy"]))
        amap = np.asarray(img.dataobj)
        assert set(np.unique(amap)) - {0} <= set(legend), "codes without a legend entry"
        ijk = np.argwhere(amap > 0)
        x = ijk @ img.affine[:3, :3].T[:, 0] + img.affine[0, 3]
        cls = np.array([legend[int(k)][1] for k in amap[amap > 0]])
        left, right = np.char.endswith(cls, "_L"), np.char.endswith(cls, "_R")
        assert x[left].mean() < x[right].mean() - 30, rec["modality"]
        if rec["modality"] != "CT":
            continue
        for e in by_study[keyer.study(rec["study_uid"])]:
            if e.kernel != "soft":
                continue
            views, coords, _ = c.views(e, ["bone"])
            _, code = token_codes(e.grid_affine_array, coords, img)
            mean = views[:, 0].astype(float).mean(1)
            bone_tok += list(mean[code == TISSUE_CODES["bone"]])
            wm_tok += list(mean[np.isin(code, [TISSUE_CODES["white_matter_L"], TISSUE_CODES["white_matter_R"]])])
    assert len(bone_tok) > 20 and len(wm_tok) > 20
    assert np.median(bone_tok) > np.median(wm_tok) + 25, (np.median(bone_tok), np.median(wm_tok))


def test_anatomy_backfill_rebuilds_the_same_map(archive):
    """`synth --anatomy-only` rebuilds a missing map from the plan: the same head, the same labels;
    other plan values than the archive's are refused."""
    from neurovfm.errors import NeuroVFMError
    from neurovfm.synth.archive import write_anatomy_maps

    out, _ = archive
    rec = _records(out)[0]
    path = os.path.join(out, rec["anatomy"])
    before = nib.load(path)
    data, affine = np.asarray(before.dataobj).copy(), before.affine.copy()
    os.remove(path)
    counts = write_anatomy_maps(out, N_STUDIES, SEED, workers=1, progress=False)
    assert counts == {"kept": N_STUDIES - 1, "written": 1}
    after = nib.load(path)
    assert np.array_equal(np.asarray(after.dataobj), data) and np.allclose(after.affine, affine)
    with pytest.raises(NeuroVFMError, match="written with"):
        write_anatomy_maps(out, N_STUDIES + 1, SEED, progress=False)
