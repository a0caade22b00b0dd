"""Label tables (acuity, parents, CT <-> MRI) and the synthetic report / indication writer."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurovfm.synth import tables
from neurovfm.synth.reports import Finding, format_size, indication, label_phrases, write_report

TABLE_DIR = Path(tables.__file__).resolve().parent / "tables"
REPO = Path(__file__).resolve().parents[1]
MODS = ("CT", "MR")


def _names(mod: str) -> list[str]:
    fname = {"CT": "ct_labels.txt", "MR": "mri_labels.txt"}[mod]
    return [line.strip() for line in (TABLE_DIR / fname).read_text().splitlines() if line.strip()]


def _acuity_rows() -> list[dict]:
    with open(TABLE_DIR / "label_acuity.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text) if s.strip()]


def _positive(text: str) -> str:
    """The findings text without its negations."""
    keep = [s for s in _sentences(text)
            if not re.search(r"\b(no|not)\b", s, re.I) and "midline structures are centered" not in s]
    return " ".join(keep)


def _closure(mod: str, labels) -> set[str]:
    return tables.close_labels(mod, labels)


# ============================================================================================
# tables


def test_packaged_label_lists_match_shared():
    for shared in (REPO / "shared" / "labels", REPO.parent / "shared" / "labels"):
        if shared.is_dir():
            break
    else:
        pytest.skip("no shared/labels next to the checkout")
    assert (TABLE_DIR / "ct_labels.txt").read_text().split() == (shared / "ct.txt").read_text().split()
    assert (TABLE_DIR / "mri_labels.txt").read_text().split() == (shared / "mri.txt").read_text().split()


def test_label_names_api():
    assert tables.label_names("CT") == _names("CT")
    assert tables.label_names("MR") == _names("MR")
    assert tables.label_names("mri") == _names("MR")
    assert len(_names("CT")) == 82 and len(_names("MR")) == 74
    with pytest.raises(ValueError):
        tables.label_names("PET")


def test_acuity_table_covers_every_label_once():
    rows = _acuity_rows()
    assert list(rows[0].keys()) == ["modality", "label", "acuity", "parents"]
    keys = [(r["modality"], r["label"]) for r in rows]
    assert len(keys) == len(set(keys))
    expected = {(m, n) for m in MODS for n in _names(m)}
    assert set(keys) == expected
    assert {r["acuity"] for r in rows} <= {"Urgent", "Routine", "Normal"}
    for m in MODS:
        for n in _names(m):
            assert tables.acuity(m, n) in tables.ACUITY_LEVELS


def test_parents_exist_in_same_modality_and_are_acyclic():
    rows = _acuity_rows()
    graph: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        ps = [p for p in r["parents"].split("|") if p] if r["parents"] else []
        names = set(_names(r["modality"]))
        for p in ps:
            assert p in names, (r["modality"], r["label"], p)
            assert p != r["label"]
        graph[(r["modality"], r["label"])] = ps

    def reaches_self(mod, start):
        seen, stack = set(), list(graph[(mod, start)])
        while stack:
            cur = stack.pop()
            if cur == start:
                return True
            if cur not in seen:
                seen.add(cur)
                stack.extend(graph[(mod, cur)])
        return False

    for mod, label in graph:
        assert not reaches_self(mod, label), (mod, label)


def test_required_parent_links():
    ct_ich = ["intraparenchymal_hemorrhage", "acute_subdural_hematoma", "subacute_chronic_subdural_hematoma",
              "epidural_hematoma", "traumatic_subarachnoid_hemorrhage", "aneurysmal_subarachnoid_hemorrhage",
              "intraventricular_hemorrhage"]
    for lab in ct_ich:
        assert "intracranial_hemorrhage" in tables.parents("CT", lab), lab
    for lab in ("brain_herniation", "midline_shift"):
        assert "brain_mass_effect" in tables.parents("CT", lab)
    for lab in ("brain_herniation", "brain_midline_shift"):
        assert "brain_mass_effect" in tables.parents("MR", lab)
    for lab in ("subdural_hematoma", "epidural_hematoma", "intraparenchymal_hemorrhage",
                "intraventricular_hemorrhage", "traumatic_subarachnoid_hemorrhage",
                "aneurysmal_subarachnoid_hemorrhage"):
        assert "intracranial_hemorrhage" in tables.parents("MR", lab), lab
    for lab in ("glioma", "high_grade_glioma", "low_grade_glioma", "brainstem_glioma", "meningioma",
                "lymphoma", "brain_metastasis"):
        assert "brain_tumor" in tables.parents("MR", lab), lab
    assert set(tables.parents("MR", "high_grade_glioma")) == {"glioma", "brain_tumor"}
    assert tables.parents("CT", "cerebral_atrophy") == []


def test_close_labels_adds_ancestors():
    assert tables.close_labels("CT", {"intraparenchymal_hemorrhage"}) == {
        "intraparenchymal_hemorrhage", "intracranial_hemorrhage"}
    assert tables.close_labels("MR", {"high_grade_glioma"}) == {"high_grade_glioma", "glioma", "brain_tumor"}
    assert tables.close_labels("CT", {"midline_shift", "cerebral_atrophy"}) == {
        "midline_shift", "brain_mass_effect", "cerebral_atrophy"}
    assert tables.close_labels("CT", set()) == set()
    with pytest.raises(ValueError):
        tables.close_labels("CT", {"brain_midline_shift"})  # an MR-only name
    for m in MODS:
        for n in _names(m):
            closed = tables.close_labels(m, {n})
            assert closed == {n, *tables.parents(m, n)}
            assert tables.close_labels(m, closed) == closed  # closure is idempotent


def test_ct_mri_mapping():
    with open(TABLE_DIR / "ct_mri_labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0].keys()) == ["ct_label", "mri_label"]
    ct, mr = set(_names("CT")), set(_names("MR"))
    for r in rows:
        assert r["ct_label"] in ct and r["mri_label"] in mr, r
    # identical names map to each other
    for n in sorted(ct & mr):
        assert n in tables.ct_to_mri(n) and n in tables.mri_to_ct(n), n
    assert tables.ct_to_mri("midline_shift") == ["brain_midline_shift"]
    assert tables.ct_to_mri("acute_subdural_hematoma") == ["subdural_hematoma"]
    assert set(tables.mri_to_ct("subdural_hematoma")) == {
        "acute_subdural_hematoma", "subacute_chronic_subdural_hematoma"}
    assert tables.ct_to_mri("cerebral_venous_sinus_thrombosis") == ["venous_sinus_thrombosis"]
    assert tables.ct_to_mri("craniotomy") == ["craniotomy_craniectomy"]
    assert tables.ct_to_mri("resection_cavity") == ["tumor_resection_cavity"]
    assert "brain_tumor" in tables.ct_to_mri("intra_axial_brain_tumor")
    assert tables.ct_to_mri("thyroid_nodule") == []
    with pytest.raises(ValueError):
        tables.ct_to_mri("brain_midline_shift")
    with pytest.raises(ValueError):
        tables.mri_to_ct("midline_shift")


def test_acuity_spot_checks():
    urgent = {
        "CT": ["intraparenchymal_hemorrhage", "acute_subdural_hematoma", "epidural_hematoma", "brain_herniation",
               "midline_shift", "acute_ischemic_stroke", "large_vessel_occlusion", "obstructive_hydrocephalus",
               "pneumocephalus", "displaced_skull_fracture", "cerebral_abscess", "cerebral_subdural_empyema",
               "cerebral_venous_sinus_thrombosis", "arterial_dissection", "intracranial_hemorrhage"],
        "MR": ["acute_ischemic_stroke", "subdural_hematoma", "brain_herniation", "brain_midline_shift",
               "brain_abscess", "venous_sinus_thrombosis", "obstructive_hydrocephalus", "intraventricular_hemorrhage"],
    }
    routine = {
        "CT": ["cerebral_atrophy", "small_vessel_ischemic_disease", "craniotomy", "resection_cavity",
               "postsurgical_changes", "encephalomalacia_gliosis", "chiari_malformation", "sinusitis"],
        "MR": ["chronic_ischemic_stroke", "multiple_sclerosis", "small_vessel_ischemic_disease", "meningioma",
               "craniotomy_craniectomy", "tumor_resection_cavity", "cerebral_atrophy"],
    }
    normal = {"CT": ["mega_cisterna_magna", "arachnoid_cyst"],
              "MR": ["cavum_septum_pellucidum", "mega_cisterna_magna", "arachnoid_cyst", "pineal_cyst"]}
    for want, table in (("Urgent", urgent), ("Routine", routine), ("Normal", normal)):
        for m, labs in table.items():
            for lab in labs:
                assert tables.acuity(m, lab) == want, (m, lab)


def test_triage():
    assert tables.triage("CT", []) == "Normal"
    assert tables.triage("CT", ["arachnoid_cyst"]) == "Normal"
    assert tables.triage("CT", ["arachnoid_cyst", "cerebral_atrophy"]) == "Routine"
    assert tables.triage("CT", ["cerebral_atrophy", "epidural_hematoma", "arachnoid_cyst"]) == "Urgent"
    assert tables.triage("MR", {"cavum_septum_pellucidum", "pineal_cyst"}) == "Normal"
    assert tables.triage("mri", ["multiple_sclerosis"]) == "Routine"
    with pytest.raises(ValueError):
        tables.triage("CT", ["not_a_label"])
    # a label is never less urgent than what it implies
    for m in MODS:
        for n in _names(m):
            assert tables.triage(m, [n]) == tables.triage(m, tables.close_labels(m, [n])) == tables.acuity(m, n)


# --- validation of broken tables --------------------------------------------------------


@pytest.fixture
def table_copy(tmp_path):
    dst = tmp_path / "tables"
    shutil.copytree(TABLE_DIR, dst)
    return dst


def _edit_line(path: Path, find: str, replace: str) -> int:
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(find):
            lines[i] = replace + "\n"
            path.write_text("".join(lines))
            return i + 1
    raise AssertionError(find)


def test_validate_packaged_tables():
    tables.validate_all()
    tables.validate_all(str(TABLE_DIR))


@pytest.mark.parametrize("find,replace,message", [
    ("CT,cerebral_atrophy,", "CT,cerebral_atrophyy,Routine,", "unknown CT label"),
    ("CT,cerebral_atrophy,", "CT,cerebral_atrophy,Soon,", "bad acuity"),
    ("MR,glioma,", "MR,glioma,Routine,brain_tumor|high_grade_glioma", "cycle"),
    ("CT,midline_shift,", "CT,midline_shift,Urgent,brain_midline_shift", "unknown CT parent"),
])
def test_validation_reports_file_and_line(table_copy, find, replace, message):
    csv_path = table_copy / "label_acuity.csv"
    lineno = _edit_line(csv_path, find, replace)
    with pytest.raises(ValueError) as err:
        tables.validate_all(str(table_copy))
    text = str(err.value)
    assert message in text
    assert "label_acuity.csv:" in text
    if message != "cycle":
        assert f"label_acuity.csv:{lineno}:" in text
    else:
        assert re.search(r"label_acuity\.csv:\d+:", text)


def test_validation_missing_row_and_bad_mapping(table_copy):
    csv_path = table_copy / "label_acuity.csv"
    lines = [ln for ln in csv_path.read_text().splitlines() if not ln.startswith("MR,pineal_cyst,")]
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="pineal_cyst"):
        tables.validate_all(str(table_copy))
    shutil.copy(TABLE_DIR / "label_acuity.csv", csv_path)
    map_path = table_copy / "ct_mri_labels.csv"
    lineno = _edit_line(map_path, "midline_shift,", "midline_shift,midline_shift")
    with pytest.raises(ValueError, match=rf"ct_mri_labels\.csv:{lineno}: unknown MR label"):
        tables.validate_all(str(table_copy))


def test_validation_rejects_acuity_below_parent(table_copy):
    _edit_line(table_copy / "label_acuity.csv", "CT,epidural_hematoma,", "CT,epidural_hematoma,Routine,intracranial_hemorrhage")
    with pytest.raises(ValueError, match="epidural_hematoma"):
        tables.validate_all(str(table_copy))


# ============================================================================================
# reports

_LATERAL_CYCLE = ("left", "right", "bilateral", "midline")


def _all_labels():
    return [(m, n) for m in MODS for n in _names(m)]


def test_every_label_has_phrases():
    for m, n in _all_labels():
        ph = label_phrases(n)
        assert ph and all(isinstance(p, str) and p for p in ph)
    with pytest.raises(ValueError):
        label_phrases("nope")


def test_single_finding_mentions_side_and_phrase():
    for i, (m, n) in enumerate(_all_labels()):
        for j, side in enumerate(_LATERAL_CYCLE):
            rng = np.random.default_rng(1000 * i + j)
            f = Finding(n, side, 12.0 + j)
            rep = write_report(m, [f], rng)
            pos = _positive(rep["findings"]).lower()
            assert re.search(rf"\b{side}", pos), (m, n, side, rep["findings"])
            assert any(p.lower() in pos for p in label_phrases(n)), (m, n, rep["findings"])
            imp = rep["impression"]
            assert imp.startswith("1. ")
            if side in ("left", "right"):
                assert re.search(rf"\b{side}", imp.lower()), (m, n, imp)
            assert any(p.lower() in imp.lower() for p in label_phrases(n)), (m, n, imp)


def test_explicit_location_is_used():
    rng = np.random.default_rng(3)
    f = Finding("intraparenchymal_hemorrhage", "left", 14.0, "Urgent", "left basal ganglia")
    rep = write_report("CT", [f], rng)
    assert "left basal ganglia" in rep["findings"]
    # a location naming the other side is corrected to the finding's side
    rep = write_report("CT", [Finding("meningioma", "right", 20.0, location="left frontal convexity")],
                       np.random.default_rng(4))
    assert "right frontal convexity" in rep["findings"]


_FORBIDDEN = [
    # (labels any of which present, negation patterns that must not appear)
    ({"intracranial_hemorrhage"}, [r"\bno\b[^.]*intracranial hemorrhage"]),
    ({"midline_shift", "brain_midline_shift"}, [r"\bno\b[^.]*midline shift", r"midline structures are centered"]),
    ({"brain_mass_effect"}, [r"\bno\b[^.]*mass effect", r"without mass effect"]),
    ({"brain_herniation"}, [r"\bno\b[^.]*herniation", r"basal cisterns are (patent|preserved)"]),
    ({"ventriculomegaly", "obstructive_hydrocephalus", "hydrocephalus_ex_vacuo", "slit_ventricle"},
     [r"ventricles are normal", r"ventricular size is within normal", r"\bno\b[^.]*hydrocephalus"]),
    ({"acute_ischemic_stroke", "large_vessel_occlusion"},
     [r"\bno\b[^.]*infarct", r"gray-white matter differentiation is preserved", r"no hyperdense vessel"]),
    ({"acute_subdural_hematoma", "subacute_chronic_subdural_hematoma", "subdural_hematoma", "epidural_hematoma",
      "subdural_hygroma_effusions", "cerebral_subdural_empyema"}, [r"\bno\b[^.]*extra-axial"]),
    ({"displaced_skull_fracture", "nondisplaced_skull_fracture", "skull_base_fracture"},
     [r"\bno\b[^.]*fracture", r"calvarium is intact"]),
    ({"craniotomy", "craniotomy_craniectomy", "burr_hole", "cranioplasty_implant"}, [r"calvarium is intact"]),
    ({"sinusitis", "mastoid_effusion"}, [r"sinuses and mastoid[^.]* (clear|well aerated)"]),
    ({"brain_tumor", "intra_axial_brain_tumor", "extra_axial_brain_tumor"}, [r"\bno\b[^.]*intracranial mass"]),
]


def _assert_no_contradiction(mod: str, labels, text: str):
    closed = _closure(mod, labels)
    low = text.lower()
    for trigger, patterns in _FORBIDDEN:
        if closed & trigger:
            for pat in patterns:
                assert not re.search(pat, low), (labels, pat, text)
    # no present finding's own phrase is ever negated
    for s in (x.lower() for x in _sentences(text)):
        m = re.search(r"\b(no|without|not)\b", s)
        if not m:
            continue
        after = s[m.start():]
        for lab in closed:
            for p in label_phrases(lab):
                assert p.lower() not in after, (lab, p, s)


def test_never_negates_a_present_finding():
    for i, (m, n) in enumerate(_all_labels()):
        for seed in range(6):
            rng = np.random.default_rng(7919 * i + seed)
            rep = write_report(m, [Finding(n, _LATERAL_CYCLE[seed % 4], 15.0)], rng)
            _assert_no_contradiction(m, [n], rep["findings"])
            _assert_no_contradiction(m, [n], rep["impression"])


def test_midline_shift_study_has_no_shift_negation():
    fs = [Finding("acute_subdural_hematoma", "right", 11.0, location="right cerebral convexity"),
          Finding("midline_shift", "left", extra={"shift_mm": 6.0})]
    for seed in range(40):
        rep = write_report("CT", fs, np.random.default_rng(seed))
        low = rep["findings"].lower()
        assert "no midline shift" not in low
        assert "midline shift" in low
        assert re.search(r"\b(6 mm|0\.6 cm)\b", rep["findings"]), rep["findings"]
        assert re.search(r"leftward|to the left", low)
        _assert_no_contradiction("CT", ["acute_subdural_hematoma", "midline_shift"], rep["findings"])


def test_combined_study_no_contradictions():
    studies = [
        ("CT", [Finding("intraparenchymal_hemorrhage", "left", 14.0), Finding("cerebral_edema", "left", 30.0),
                Finding("midline_shift", "right", extra={"shift_mm": 5.0}), Finding("intraventricular_hemorrhage", "bilateral"),
                Finding("obstructive_hydrocephalus", "bilateral")]),
        ("CT", [Finding("displaced_skull_fracture", "right", 6.0), Finding("epidural_hematoma", "right", 12.0),
                Finding("pneumocephalus", "right"), Finding("scalp_hemorrhage_hematoma", "right", 20.0)]),
        ("MR", [Finding("high_grade_glioma", "left", 41.0), Finding("cerebral_edema", "left", 50.0),
                Finding("brain_herniation", "left", extra={"type": "subfalcine"})]),
        ("MR", [Finding("tumor_resection_cavity", "right", 25.0), Finding("craniotomy_craniectomy", "right"),
                Finding("postsurgical_changes", "right")]),
        ("MR", [Finding("acute_ischemic_stroke", "right", 35.0), Finding("small_vessel_ischemic_disease", "bilateral"),
                Finding("cerebral_atrophy", "bilateral")]),
    ]
    for mod, fs in studies:
        for seed in range(25):
            rep = write_report(mod, fs, np.random.default_rng(seed))
            _assert_no_contradiction(mod, [f.label for f in fs], rep["findings"])


def test_normal_study():
    for mod in MODS:
        assert tables.triage(mod, []) == "Normal"
        for seed in range(10):
            rep = write_report(mod, [], np.random.default_rng(seed))
            assert set(rep) == {"exam_type", "findings", "impression"}
            assert re.fullmatch(
                r"1\. (No acute intracranial (abnormality|process)|Normal .*|Unremarkable .*)\.", rep["impression"]
            ), rep["impression"]
            low = rep["findings"].lower()
            assert "intracranial hemorrhage" in low and "no" in low
            assert "midline shift" in low or "midline structures are centered" in low
            assert "ventricles are normal" in low or "ventricular size is within normal" in low or "hydrocephalus" in low
    # normal variants only: normal triage, normal-variant wording
    labs = ["cavum_septum_pellucidum", "pineal_cyst"]
    assert tables.triage("MR", labs) == "Normal"
    rep = write_report("MR", [Finding(lab, "midline", 6.0) for lab in labs], np.random.default_rng(0))
    assert "cavum septum pellucidum" in rep["findings"].lower()


def test_important_negations_present_when_absent():
    f = [Finding("cerebral_atrophy", "bilateral")]
    for seed in range(15):
        low = write_report("CT", f, np.random.default_rng(seed))["findings"].lower()
        assert re.search(r"\bno\b[^.]*intracranial hemorrhage", low)
        assert re.search(r"\bno\b[^.]*midline shift|midline structures are centered", low)


def test_impression_ordered_by_acuity_and_implied_not_repeated():
    fs = [Finding("cerebral_atrophy", "bilateral"), Finding("mega_cisterna_magna", "midline"),
          Finding("intraparenchymal_hemorrhage", "right", 20.0), Finding("intracranial_hemorrhage", "right", 20.0)]
    for seed in range(20):
        rep = write_report("CT", fs, np.random.default_rng(seed))
        lines = [ln for ln in rep["impression"].splitlines() if re.match(r"\d+\. ", ln)]
        assert [int(ln.split(".")[0]) for ln in lines] == list(range(1, len(lines) + 1))
        assert len(lines) == 3
        def where(label):
            return next(i for i, ln in enumerate(lines) if any(p.lower() in ln.lower() for p in label_phrases(label)))
        assert where("intraparenchymal_hemorrhage") < where("cerebral_atrophy") < where("mega_cisterna_magna")
        assert "right" in lines[0].lower()


def test_determinism_and_variation():
    fs = [Finding("acute_subdural_hematoma", "left", 9.0, location="left cerebral convexity"),
          Finding("midline_shift", "right", extra={"shift_mm": 4.0})]
    for mod in MODS:
        labs = fs if mod == "CT" else [Finding("subdural_hematoma", "left", 9.0), Finding("brain_midline_shift", "right", 4.0)]
        a = write_report(mod, labs, np.random.default_rng(123))
        b = write_report(mod, labs, np.random.default_rng(123))
        assert a == b
        texts = {write_report(mod, labs, np.random.default_rng(s))["findings"] for s in range(10)}
        assert len(texts) >= 3
        ia = indication(mod, labs, 70, "F", np.random.default_rng(5))
        ib = indication(mod, labs, 70, "F", np.random.default_rng(5))
        assert ia == ib


def test_same_text_in_another_process():
    """No set or dict iteration order (hash randomisation) leaks into the text."""
    script = (
        "import numpy as np\n"
        "from neurovfm.synth.reports import Finding, write_report, indication\n"
        "fs = [Finding('intraparenchymal_hemorrhage', 'left', 14.0), Finding('midline_shift', 'right', 5.0),\n"
        "      Finding('cerebral_atrophy', 'bilateral'), Finding('intracranial_hemorrhage', 'left')]\n"
        "for s in range(5):\n"
        "    r = np.random.default_rng(s)\n"
        "    print(repr(write_report('CT', fs, r)), indication('CT', fs, 80, 'F', r))\n"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


def test_format_size():
    assert format_size(14.0, "mm") == "14 mm" and format_size(14.0, "cm") == "1.4 cm"
    assert format_size(8.0, "mm") == "8 mm" and format_size(8.0, "cm") == "0.8 cm"
    assert format_size(6.5, "mm") == "6.5 mm"
    assert format_size(14.5, "mm") == "15 mm" and format_size(14.5, "cm") == "1.5 cm"
    assert format_size(23.2, "mm") == "23 mm" and format_size(23.2, "cm") == "2.3 cm"
    assert format_size(99.6, "cm") == "10.0 cm"
    with pytest.raises(ValueError):
        format_size(3.0, "in")


@pytest.mark.parametrize("mod,label,size", [
    ("CT", "intraparenchymal_hemorrhage", 14.0), ("CT", "acute_subdural_hematoma", 9.0),
    ("CT", "extra_axial_brain_tumor", 23.0), ("CT", "displaced_skull_fracture", 6.0),
    ("CT", "arachnoid_cyst", 42.0), ("MR", "meningioma", 31.0), ("MR", "colloid_cyst", 8.0),
    ("MR", "acute_ischemic_stroke", 35.0), ("MR", "high_grade_glioma", 47.0), ("MR", "chiari_malformation", 7.0),
])
def test_sizes_in_mm_or_cm(mod, label, size):
    mm, cm = format_size(size, "mm"), format_size(size, "cm")
    units = set()
    for seed in range(30):
        rep = write_report(mod, [Finding(label, "left", size)], np.random.default_rng(seed))
        text = rep["findings"]
        assert mm in text or cm in text, text
        units.add("mm" if mm in text else "cm")
        for found in re.findall(r"\b\d+(?:\.\d+)? (?:mm|cm)\b", text + " " + rep["impression"]):
            assert found in (mm, cm), (found, text)
    if size >= 10:
        assert units == {"mm", "cm"}


def test_no_names_dates_or_times():
    month = r"\b(january|february|march|april|may|june|july|august|september|october|november|december)\b"
    for i, (m, n) in enumerate(_all_labels()):
        rng = np.random.default_rng(i)
        fs = [Finding(n, "left", 10.0)]
        rep = write_report(m, fs, rng)
        text = " ".join(rep.values()) + " " + indication(m, fs, 64, "M", rng)
        assert not re.search(r"\b\d{1,2}/\d{1,2}(/\d{2,4})?\b|\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}\b", text)
        assert not re.search(month, text.lower())
        assert not re.search(r"\b(dr|mr|mrs|ms)\.\s", text.lower())


def test_exam_type():
    rng = np.random.default_rng(0)
    assert write_report("CT", [], rng)["exam_type"] == "CT head without contrast"
    assert write_report("MR", [Finding("meningioma", "left", 20.0)], rng)["exam_type"] == \
        "MRI brain with and without contrast"
    assert write_report("MR", [], rng)["exam_type"].startswith("MRI brain with")
    assert write_report("MR", [], rng, exam="MRI brain without contrast")["exam_type"] == "MRI brain without contrast"


def test_finding_validation():
    with pytest.raises(ValueError):
        Finding("intraparenchymal_hemorrhage", "up", 3.0)
    with pytest.raises(ValueError):
        Finding("no_such_label", "left", 3.0)
    with pytest.raises(ValueError):
        Finding("meningioma", "left", -1.0)
    with pytest.raises(ValueError):
        Finding("meningioma", "left", 3.0, acuity="Soon")
    f = Finding("meningioma", "left", 3)
    assert f.size_mm == 3.0 and f.extra == {}


# --- indications -------------------------------------------------------------------------


def test_indication_shape_and_no_leak():
    cases = [
        ("CT", [Finding("intraparenchymal_hemorrhage", "left", 14.0)], ("hemorrhage", "hematoma", "intraparenchymal")),
        ("CT", [Finding("acute_subdural_hematoma", "right", 9.0), Finding("midline_shift", "left", 5.0)],
         ("subdural", "hematoma", "hemorrhage", "midline")),
        ("MR", [Finding("acute_ischemic_stroke", "right", 30.0)], ("infarct", "ischemi")),
        ("CT", [Finding("obstructive_hydrocephalus", "bilateral")], ("hydrocephalus", "ventric")),
        ("MR", [Finding("brain_abscess", "left", 20.0)], ("abscess",)),
    ]
    for mod, fs, forbidden in cases:
        for seed in range(40):
            line = indication(mod, fs, 70, "M", np.random.default_rng(seed))
            assert "\n" not in line and line.endswith(".") and (line[0].isupper() or line[0].isdigit()), line
            assert not any(w in line.lower() for w in forbidden), (line, fs)
            assert "{" not in line


def test_indication_is_plausible():
    stroke = [Finding("acute_ischemic_stroke", "right", 30.0, location="right middle cerebral artery territory")]
    lines = [indication("CT", stroke, 70, "F", np.random.default_rng(s)) for s in range(60)]
    assert any("left-sided" in ln or "left hemiparesis" in ln.lower() for ln in lines)
    assert not any("right-sided" in ln or "right hemiparesis" in ln.lower() for ln in lines)

    trauma = [Finding("epidural_hematoma", "left", 10.0), Finding("nondisplaced_skull_fracture", "left")]
    lines = [indication("CT", trauma, 30, "M", np.random.default_rng(s)) for s in range(60)]
    trauma_words = ("fall", "trauma", "collision", "assault", "found down", "injury")
    assert sum(any(w in ln.lower() for w in trauma_words) for ln in lines) >= 30

    tumour = [Finding("glioma", "left", 30.0)]
    lines = [indication("MR", tumour, 50, "F", np.random.default_rng(s)) for s in range(60)]
    assert any("follow-up of known glioma" in ln.lower() for ln in lines)
    assert len(set(lines)) >= 4

    normal = [indication("CT", [], 40, "F", np.random.default_rng(s)) for s in range(60)]
    assert any(ln.startswith("Headache") or "headache" in ln for ln in normal)
    with_age = [ln for ln in normal if "40" in ln]
    assert 0 < len(with_age) < len(normal)
    assert all(re.search(r"40-year-old (woman|patient)|40F", ln) for ln in with_age)
    assert not any("with code stroke" in indication("CT", stroke, 70, "F", np.random.default_rng(s)).lower()
                   for s in range(200))
    kid = [indication("MR", [Finding("chiari_malformation", "midline", 7.0)], 6, "M", np.random.default_rng(s))
           for s in range(40)]
    assert not any("man with" in ln for ln in kid)


def test_synth_and_rekey_cli_refuse_bad_arguments(tmp_path, capsys):
    from neurovfm.cli import main

    assert main(["synth", str(tmp_path / "a"), "--studies", "0"]) == 2
    assert main(["rekey", str(tmp_path), "--out", str(tmp_path / "k")]) == 2
    assert "labels.csv" in capsys.readouterr().err
