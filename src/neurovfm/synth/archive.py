"""``neurovfm synth``: a hospital-like archive with ground truth, written as real DICOM.

Planning (deterministic per seed) decides patients, studies, modality, splits (by patient:
train / val / test), ages, sexes and pathology families, with prevalence control so that every
headline label has enough positive test studies. Each study is then rendered independently in a
worker (its own random stream): one subject built from the template anatomy, pathology drawn
into it, every series of the exam acquired with its own protocol and written with the
project's one DICOM writer, lesion masks written as NIfTI in each series' scanner space, and
one anatomical label map per study (AAL3 regions and tissue classes of this head, scanner RAS;
:mod:`neurovfm.synth.atlas_maps`).
Patients with both a CT and an MRI study get the same head and the same disease.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
from tqdm import tqdm

from neurovfm.errors import NeuroVFMError
from neurovfm.synth import reports, tables
from neurovfm.synth.anatomy import disease_csf, make_subject
from neurovfm.synth.atlas_maps import write_anatomy_map, write_legend
from neurovfm.synth.assets import load_template
from neurovfm.synth.dicom_writer import Identity, SeriesSpec, write_series
from neurovfm.synth.pathology import CT_ONLY, FAMILIES, MR_ONLY, Painter
from neurovfm.synth.scanner import Protocol, Site, ct_series, mr_series

SPLITS = (("train", 0.55), ("val", 0.15), ("test", 0.30))
HEADLINE = ("intracranial_hemorrhage", "acute_ischemic_stroke", "brain_mass_effect", "small_vessel_ischemic_disease",
            "cerebral_atrophy", "ventriculomegaly")
# families that make each headline label positive (planning-level prevalence control)
HEADLINE_FAMILIES = {
    "intracranial_hemorrhage": ("iph", "sdh_acute", "sdh_chronic", "edh", "sah_trauma", "sah_aneurysm", "ivh"),
    "acute_ischemic_stroke": ("infarct_acute",),
    "brain_mass_effect": ("big_mass",),
    "small_vessel_ischemic_disease": ("svd",),
    "cerebral_atrophy": ("atrophy",),
    "ventriculomegaly": ("ventriculomegaly", "hydrocephalus"),
}
PREVALENCE = {
    "iph": 0.11, "sdh_acute": 0.08, "sdh_chronic": 0.06, "edh": 0.03, "sah_trauma": 0.06, "sah_aneurysm": 0.03,
    "ivh": 0.04, "contusion": 0.05, "infarct_acute": 0.30, "infarct_chronic": 0.14, "lacune": 0.10,
    "svd": 0.32, "ms": 0.06, "glioma": 0.08, "metastases": 0.07, "meningioma": 0.08, "hydrocephalus": 0.10,
    "ventriculomegaly": 0.22, "atrophy": 0.30, "arachnoid_cyst": 0.05, "fracture": 0.10, "pneumocephalus": 0.06,
    "craniotomy": 0.07, "bg_calc": 0.10, "chiari": 0.05, "csp": 0.08, "mega_cm": 0.05, "big_mass": 0.12,
}
NORMAL_FRACTION = 0.12
GIVEN = ["ALEX", "SAM", "JORDAN", "TAYLOR", "MORGAN", "CASEY", "RILEY", "JAMIE", "AVERY", "QUINN", "ROBIN", "DANA",
         "LEE", "KIM", "PAT", "CHRIS", "FRANCIS", "TERRY", "JESSE", "SHAWN"]
FAMILY_NAMES = ["ABERNATHY", "BALDWIN", "CASTELLANO", "DUBOIS", "ESPOSITO", "FAIRCHILD", "GALLAGHER", "HALVORSEN",
                "IVANOVA", "JANSSEN", "KOWALCZYK", "LINDQVIST", "MORETTI", "NAKAMURA", "OKONKWO", "PETROV",
                "QUINTERO", "ROSSITER", "SZABO", "TANAKA", "UHLMANN", "VASQUEZ", "WINTERBOTTOM", "XIMENES"]


@dataclass
class StudyPlan:
    index: int
    patient: int
    modality: str
    split: str
    age: int
    sex: str
    families: list[str]
    subject_seed: int  # shared by a patient's CT and MR studies
    study_seed: int
    site: str = "main"


def _split_of(patient: int, seed: int) -> str:
    u = np.random.default_rng([seed, 7, patient]).random()
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1][0]


def plan_archive(n_studies: int, seed: int, site: str = "main") -> list[StudyPlan]:
    """Patients, studies, splits and pathology families, with headline prevalence control."""
    rng = np.random.default_rng([seed, 1])
    plans: list[StudyPlan] = []
    patient = 0
    while len(plans) < n_studies:
        age = int(np.clip(rng.normal(62, 17), 18, 96))
        sex = "M" if rng.random() < 0.5 else "F"
        both = rng.random() < 0.2 and len(plans) + 2 <= n_studies
        mods = ["CT", "MR"] if both else (["CT"] if rng.random() < 0.5 else ["MR"])
        fams = _draw_families(rng, age)
        sseed = int(rng.integers(2 ** 31))
        for m in mods:
            fm = [f for f in fams if not (m == "CT" and f in MR_ONLY) and not (m == "MR" and f in CT_ONLY)]
            plans.append(StudyPlan(len(plans), patient, m, _split_of(patient, seed), age, sex, fm, sseed,
                                   int(rng.integers(2 ** 31)), site))
        patient += 1
    _control_prevalence(plans, rng)
    return plans


def _draw_families(rng, age: int) -> list[str]:
    if rng.random() < NORMAL_FRACTION:
        return []
    fams = []
    for fam, p in PREVALENCE.items():
        # atrophy is "volume loss advanced for age": not made likelier by age itself
        q = p * (1.6 if fam in ("svd", "infarct_chronic") and age > 70 else 1.0)
        q = q * (0.3 if fam == "svd" and age < 45 else 1.0)
        if rng.random() < q:
            fams.append(fam)
    if "hydrocephalus" in fams and "ventriculomegaly" in fams:
        fams.remove("ventriculomegaly")
    if "big_mass" in fams and not any(f in fams for f in ("iph", "sdh_acute", "glioma", "meningioma", "edh")):
        fams.append(str(rng.choice(["iph", "sdh_acute", "glioma", "meningioma"])))
    return fams


def _control_prevalence(plans: list[StudyPlan], rng, minimum: float = 0.33) -> None:
    """Top up headline families in each split and modality to at least ``minimum`` prevalence."""
    for split, _ in SPLITS:
        for mod in ("CT", "MR"):
            group = [p for p in plans if p.split == split and p.modality == mod]
            if not group:
                continue
            for label, fams in HEADLINE_FAMILIES.items():
                have = [p for p in group if any(f in p.families for f in fams)]
                need = int(math.ceil(minimum * len(group))) - len(have)
                pool = [p for p in group if p not in have and p.families]
                rng.shuffle(pool)
                pool.sort(key=lambda p: len(p.families))  # spread findings: fill the least busy studies first
                for p in pool[:max(need, 0)]:
                    p.families.append(fams[0] if label != "brain_mass_effect" else "big_mass")
                    if label == "brain_mass_effect" and not any(f in p.families for f in ("iph", "sdh_acute", "glioma", "meningioma", "edh")):
                        p.families.append("glioma")


# -- rendering one study --------------------------------------------------------------------------

_TEMPLATE = None


def _template():
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = load_template()
    return _TEMPLATE


def _identity(plan: StudyPlan, seed: int, site: Site) -> Identity:
    r = np.random.default_rng([seed, 11, plan.patient])
    birth_year = 2025 - plan.age
    name = f"{FAMILY_NAMES[int(r.integers(len(FAMILY_NAMES)))]}^{GIVEN[int(r.integers(len(GIVEN)))]}"
    sr = np.random.default_rng([seed, 13, plan.index])
    return Identity(
        patient_name=name,
        patient_id=f"MRN{int(r.integers(10 ** 7, 10 ** 8))}",
        birth_date=f"{birth_year}{int(r.integers(1, 13)):02d}{int(r.integers(1, 29)):02d}",
        sex=plan.sex,
        age=f"{plan.age:03d}Y",
        accession=f"ACC{int(sr.integers(10 ** 8, 10 ** 9))}",
        institution=f"{site.name.title()} Valley Medical Center",
        referring_physician=f"{FAMILY_NAMES[int(sr.integers(len(FAMILY_NAMES)))]}^{GIVEN[int(sr.integers(len(GIVEN)))]}",
        performing_physician=f"{FAMILY_NAMES[int(sr.integers(len(FAMILY_NAMES)))]}^RAD",
        operator=f"TECH^{GIVEN[int(sr.integers(len(GIVEN)))]}",
        study_date=f"2025{int(sr.integers(1, 13)):02d}{int(sr.integers(1, 29)):02d}",
        study_description="CT HEAD" if plan.modality == "CT" else "MRI BRAIN",
        study_uid=pydicom.uid.generate_uid(entropy_srcs=[str(seed), "study", str(plan.index)]),
    )


def _ct_protocols(rng, site: Site, head_lps: np.ndarray) -> list[Protocol]:
    thin = rng.random() < site.thin_fraction
    if thin:
        thickness = float(rng.choice([0.625, 1.0, 1.25]))
        step = thickness
    else:
        thickness = float(rng.choice([2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 6.0]))
        step = thickness + float(rng.choice([0.0, 0.0, 0.0, 0.5, 1.0]))
    fov = float(rng.uniform(205, 250))
    plane = "axial" if rng.random() < 0.9 else str(rng.choice(["coronal", "sagittal"]))
    tilt = float(rng.uniform(5, 25)) if plane == "axial" and rng.random() < 0.5 else 0.0
    extent = 165.0 if plane == "axial" else (150.0 if plane == "sagittal" else 185.0)
    n = int(math.ceil(extent / step))
    centre = head_lps + rng.normal(0, [6.0, 6.0, 5.0]) + np.array([0.0, 0.0, 5.0])
    base = dict(plane=plane, thickness=thickness, step=step, pixel=fov / 512, rows=512, cols=512, n_slices=n,
                tilt_deg=tilt, centre=tuple(centre), contrast=False)
    out = [Protocol("CT", "soft", description=f"HEAD {thickness:g}mm {plane.upper()}", **base)]
    if rng.random() < 0.6:
        out.append(Protocol("CT", "bone", description=f"HEAD BONE {thickness:g}mm", **base))
    return out


MR_TIMING = {"T1": (550, 12, None), "T1C": (550, 12, None), "T2": (4500, 100, None), "FLAIR": (9000, 125, 2500),
             "DWI": (5200, 85, None), "ADC": (5200, 85, None), "PD": (3000, 15, None), "SWI": (28, 20, None)}


def _mr_protocols(rng, site: Site, head_lps: np.ndarray, contrast: bool) -> list[Protocol]:
    seqs = ["T2", "FLAIR", "DWI", "ADC", "T1"]
    if rng.random() < 0.5:
        seqs.append("SWI")
    if rng.random() < 0.15:
        seqs.append("PD")
    if contrast:
        seqs.append("T1C")
    out = []
    oblique = float(rng.normal(0, 6))
    for seq in seqs:
        tr, te, ti = MR_TIMING[seq]
        if seq in ("T1", "T1C") and rng.random() < site.sagittal_3d_t1:
            plane, thickness, step, pixel, matrix = "sagittal", 1.0, 1.0, 1.0, 256
            tr, te, ti = 2300, 3, 900
            n = 160
        else:
            plane = "coronal" if seq == "FLAIR" and rng.random() < 0.3 else "axial"
            thickness = float(rng.choice([4.0, 5.0, 5.0, 6.0])) if seq not in ("DWI", "ADC") else 5.0
            step = thickness + float(rng.choice([0.0, 0.5, 1.0, 1.5]))
            matrix = int(rng.choice([192, 256, 256, 320]))
            pixel = float(rng.uniform(220, 240)) / matrix
            n = int(math.ceil((165.0 if plane == "axial" else 180.0) / step))
        centre = head_lps + rng.normal(0, [4.0, 4.0, 4.0]) + np.array([0.0, 0.0, 5.0])
        b = 1000.0 if seq == "DWI" else None
        desc = {"T1": "T1 SE", "T1C": "T1 POST GAD", "T2": "T2 TSE", "FLAIR": "T2 FLAIR", "DWI": "DWI TRACE",
                "ADC": "ADC MAP", "PD": "PD TSE", "SWI": "SWI"}[seq]
        out.append(Protocol("MR", seq, plane=plane, thickness=thickness, step=step, pixel=pixel, rows=matrix,
                            cols=matrix, n_slices=n, oblique_deg=oblique if plane == "axial" else 0.0,
                            centre=tuple(centre), contrast=seq == "T1C", b_value=b,
                            description=f"{plane[:3].upper()} {desc}", tr=tr, te=te, ti=ti))
    return out


def _series_affine(positions, row, col, p: Protocol) -> np.ndarray:
    """Voxel (i = column, j = row, k = slice) -> RAS mm, for masks aligned with the DICOM series."""
    a = np.eye(4)
    flip = np.array([-1.0, -1.0, 1.0])
    a[:3, 0] = np.asarray(row) * p.pixel * flip
    a[:3, 1] = np.asarray(col) * p.pixel * flip
    a[:3, 2] = (positions[1] - positions[0]) * flip if len(positions) > 1 else np.cross(row, col) * flip
    a[:3, 3] = positions[0] * flip
    return a


def _write_nifti(out: str, rel_dir: str, planes: np.ndarray, affine: np.ndarray, prot: Protocol, n: int) -> str:
    """The same series as NIfTI [i, j, k] + a BIDS-style sidecar (modality and sequence)."""
    suffix = {"T1": "T1w", "T1C": "T1w", "T2": "T2w", "FLAIR": "FLAIR", "DWI": "dwi", "ADC": "ADC", "PD": "PDw",
              "SWI": "swi", "soft": "ct", "bone": "ct"}[prot.kind]
    ce = "_ce-gad" if prot.kind == "T1C" else ""
    rec = f"_rec-{prot.kind}" if prot.modality == "CT" else ""
    base = os.path.join(out, "nifti", rel_dir, f"run-{n + 1:02d}{ce}{rec}_{suffix}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    data = np.transpose(planes, (2, 1, 0)).astype(np.int16 if prot.modality == "CT" else np.float32)
    nib.save(nib.Nifti1Image(data, affine), base + ".nii.gz")
    side = {"Modality": prot.modality, "SeriesDescription": prot.description, "SliceThickness": prot.thickness}
    if prot.modality == "CT":
        side["ConvolutionKernel"] = {"soft": "H30s", "bone": "H70h"}[prot.kind]
    else:
        side.update({k: v / 1000.0 for k, v in (("RepetitionTime", prot.tr), ("EchoTime", prot.te),
                                                 ("InversionTime", prot.ti)) if v is not None})
        if prot.kind == "T1C":
            side["ContrastBolusIngredient"] = "GADOLINIUM"
    with open(base + ".json", "w") as fh:
        json.dump(side, fh, indent=1)
    return os.path.relpath(base + ".nii.gz", out)


def render_study(plan: StudyPlan, out: str, seed: int, nifti: bool = False) -> dict:
    """Render and write one study; returns its ground-truth record."""
    site = Site.named(plan.site)
    subject = _subject(plan)
    ident = _identity(plan, seed, site)
    anatomy_rel = write_anatomy_map(out, ident.study_uid, subject)  # normal anatomy, before pathology
    painter = Painter(subject, np.random.default_rng([plan.subject_seed, 5]))
    for fam in plan.families:
        if fam != "big_mass":
            FAMILIES[fam](painter)
    if "big_mass" in plan.families and not painter.push:
        # the planned space-occupying lesion came out small: make it push (real deformation)
        occupying = [les for les in painter.lesions if les.family in ("iph", "glioma", "meningioma", "sdh_acute", "edh")]
        if occupying:
            les = occupying[-1]
            painter.push.append((_centre_of(subject, les.index), 14.0, 40.0, les.side))
    painter.mimics()
    painter.apply_mass_effect()
    rng = np.random.default_rng([plan.study_seed, 9])
    head_lps = subject.world_from_template[:3, 3] * np.array([-1.0, -1.0, 1.0])
    contrast = any(f in plan.families for f in ("glioma", "metastases", "meningioma")) or rng.random() < 0.25
    protocols = _ct_protocols(rng, site, head_lps) if plan.modality == "CT" else _mr_protocols(rng, site, head_lps, contrast and plan.modality == "MR")
    study_dir = os.path.join(out, "dicom", f"P{plan.patient:05d}", f"S{plan.index:05d}")
    series_records = []
    for n, prot in enumerate(protocols):
        render = ct_series if prot.modality == "CT" else mr_series
        planes, positions, row, col, labels = render(subject, prot, site, rng)
        suid = pydicom.uid.generate_uid(entropy_srcs=[str(seed), "series", str(plan.index), str(n)])
        spec = SeriesSpec(
            modality=prot.modality, series_description=prot.description, series_number=n + 2, series_uid=suid,
            frame_of_reference_uid=pydicom.uid.generate_uid(entropy_srcs=[str(seed), "for", str(plan.index)]),
            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC") if prot.kind == "ADC" else
            (("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW") if prot.kind == "DWI" else ("ORIGINAL", "PRIMARY", "AXIAL")),
            kernel=({"soft": "H30s", "bone": "H70h"}[prot.kind] if prot.modality == "CT" else None),
            kvp=120.0 if prot.modality == "CT" else None,
            repetition_time=prot.tr, echo_time=prot.te, inversion_time=prot.ti, b_value=prot.b_value,
            field_strength=float(rng.choice([1.5, 3.0])) if prot.modality == "MR" else None,
            contrast_agent="GADOBUTROL" if prot.contrast and prot.modality == "MR" else None,
            manufacturer=site.manufacturer, model=site.model, slice_thickness=prot.thickness,
        )
        style = int(rng.integers(3))
        names = [f"IM{k:05d}.dcm" if style == 0 else (f"{k + 1:08d}" if style == 1 else f"{suid[-8:]}.{k}.dcm")
                 for k in range(len(planes))]
        sdir = os.path.join(study_dir, f"SE{n + 1:03d}")
        write_series(sdir, planes, positions, row, col, (prot.pixel, prot.pixel), ident, spec, filenames=names,
                     uid_seed=f"{seed}-{plan.index}-{n}")
        mask_rel = os.path.join("masks", f"{suid}.nii.gz")
        mask = np.transpose(labels, (2, 1, 0)).astype(np.int16)  # [i (column), j (row), k (slice)]
        os.makedirs(os.path.join(out, "masks"), exist_ok=True)
        nib.save(nib.Nifti1Image(mask, _series_affine(positions, row, col, prot)), os.path.join(out, mask_rel))
        if nifti:
            _write_nifti(out, os.path.join(f"sub-{plan.patient:05d}", f"ses-{plan.index:05d}"), planes,
                         _series_affine(positions, row, col, prot), prot, n)
        series_records.append(dict(series_uid=suid, kind=prot.kind, plane=prot.plane, thickness_mm=prot.thickness,
                                   step_mm=prot.step, pixel_mm=round(prot.pixel, 4), tilt_deg=round(prot.tilt_deg, 2),
                                   n_slices=len(planes), mask=mask_rel, path=os.path.relpath(sdir, out)))
    return {**_ground_truth(plan, painter, ident, series_records, seed), "anatomy": anatomy_rel}


def _subject(plan: StudyPlan):
    """The plan's head before pathology (the same for a study's rendering and its anatomy map)."""
    srng = np.random.default_rng([plan.subject_seed, 3])
    sulcal, vent = disease_csf(plan.age, np.random.default_rng([plan.subject_seed, 4]), "atrophy" in plan.families,
                               "ventriculomegaly" in plan.families, "hydrocephalus" in plan.families)
    return make_subject(_template(), srng, age=plan.age, sex=plan.sex, atrophy=sulcal, ventricle_mm=vent)


def _anatomy_star(args) -> str:
    plan, out, seed = args
    ident = _identity(plan, seed, Site.named(plan.site))
    if os.path.exists(os.path.join(out, "anatomy", f"{ident.study_uid}.nii.gz")):
        return "kept"
    write_anatomy_map(out, ident.study_uid, _subject(plan))
    return "written"


def write_anatomy_maps(out: str, n_studies: int, seed: int, site: str = "main", workers: int = 1,
                       progress: bool = True) -> dict:
    """Add the per-subject anatomy maps to an archive written before they existed (same plan, same
    heads: the subject is rebuilt from the plan's seeds); maps already there are kept."""
    if not os.path.exists(os.path.join(out, "records.jsonl")):
        raise NeuroVFMError(f"{out}: not a synthetic archive (no records.jsonl)")
    plans = plan_archive(n_studies, seed, site)
    with open(os.path.join(out, "records.jsonl")) as fh:
        written = {json.loads(line)["study_uid"] for line in fh if line.strip()}
    planned = {_identity(p, seed, Site.named(p.site)).study_uid for p in plans}
    if planned != written:
        raise NeuroVFMError(f"{out}: --studies {n_studies} --seed {seed} --site {site} plan {len(planned - written)} "
                            f"studies the archive does not hold and miss {len(written - planned)} it does; give the "
                            "values it was written with")
    _template()
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    counts = {"kept": 0, "written": 0}
    try:
        args = [(p, out, seed) for p in plans]
        it = pool.map(_anatomy_star, args) if pool else map(_anatomy_star, args)
        for r in tqdm(it, total=len(plans), desc="anatomy maps", unit="study", disable=not progress, file=sys.stderr):
            counts[r] += 1
    finally:
        if pool:
            pool.shutdown()
    write_legend(os.path.join(out, "tables", "anatomy_labels.csv"), _template())
    return counts


def _centre_of(subject, index: int) -> np.ndarray:
    from scipy import ndimage

    m = subject.lesion_labels == index
    return np.array(ndimage.center_of_mass(m)) if m.any() else np.array([90.0, 126.0, 100.0])

_REPORTED_EXTRA = ("shift_mm", "degree", "fazekas")  # finding details that reach findings.jsonl and the report


def _ground_truth(plan: StudyPlan, painter: Painter, ident: Identity, series: list[dict], seed: int) -> dict:
    mod = plan.modality
    findings = []
    labels: set[str] = set()
    for les in painter.lesions:
        names = les.ct_labels if mod == "CT" else les.mr_labels
        for name in names:
            labels.add(name)
            findings.append(dict(label=name, side=les.side, size_mm=les.size_mm,
                                 acuity=tables.acuity(mod, name), location=les.location, mask_index=les.index,
                                 family=les.family, **{k: les.extra[k] for k in _REPORTED_EXTRA if k in les.extra}))
    closed = tables.close_labels(mod, labels)
    rng = np.random.default_rng([plan.study_seed, 21])
    rf = [reports.Finding(label=f["label"], side=f["side"], size_mm=f["size_mm"], acuity=f["acuity"],
                          location=f["location"], extra={k: f[k] for k in _REPORTED_EXTRA if k in f}) for f in findings]
    report = reports.write_report(mod, rf, rng)
    return dict(
        study_uid=ident.study_uid, patient_id=ident.patient_id, patient=plan.patient, split=plan.split, site=plan.site,
        modality=mod, age=plan.age, sex=plan.sex, labels=sorted(closed), findings=findings,
        indication=reports.indication(mod, rf, plan.age, plan.sex, rng), report=report,
        triage=tables.triage(mod, closed), series=series,
    )


def _render_star(args):
    plan, out, seed, nifti = args
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only keeps BLAS threads from spinning beside the other workers
        return render_study(plan, out, seed, nifti)
    with threadpool_limits(1):  # one worker = one core
        return render_study(plan, out, seed, nifti)


def write_archive(out: str, n_studies: int, seed: int, site: str = "main", workers: int = 1,
                  preview: bool = False, progress: bool = True, nifti: bool = False) -> dict:
    """Plan, render and write an archive; returns a summary (counts per label and split)."""
    if n_studies < 1:
        raise ValueError(f"--studies must be >= 1, got {n_studies}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    os.makedirs(out, exist_ok=True)
    plans = plan_archive(n_studies, seed, site)
    done_path = os.path.join(out, "records.jsonl")
    done: dict[int, dict] = {}
    if os.path.exists(done_path):  # resumable: studies already written are kept
        with open(done_path) as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                    done[int(r["_index"])] = r
                except (ValueError, KeyError):
                    continue
    todo = [p for p in plans if p.index not in done]
    _template()  # build/cache the template once before forking workers
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc="studies", unit="study", disable=not progress,
               file=sys.stderr)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        args = [(p, out, seed, nifti) for p in todo]
        results = pool.map(_render_star, args) if pool else map(_render_star, args)
        with open(done_path, "a") as fh:
            for p, rec in zip(todo, results):
                rec["_index"] = p.index
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                done[p.index] = rec
                bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    records = [done[p.index] for p in plans]
    _write_tables(out, records)
    if preview:
        from neurovfm.synth.preview import write_previews

        write_previews(out, records[: min(len(records), 12)])
    return summarize(records)


def all_label_columns() -> list[str]:
    ct, mr = tables.label_names("CT"), tables.label_names("MR")
    return ct + [m for m in mr if m not in ct]


def _write_tables(out: str, records: list[dict]) -> None:
    cols = all_label_columns()
    ct, mr = set(tables.label_names("CT")), set(tables.label_names("MR"))
    rows = []
    for r in records:
        have = set(r["labels"])
        own = ct if r["modality"] == "CT" else mr
        row = dict(study_uid=r["study_uid"], patient_id=r["patient_id"], split=r["split"], site=r["site"],
                   modality=r["modality"], age=r["age"], sex=r["sex"], triage=r["triage"])
        for c in cols:
            row[c] = (1 if c in have else 0) if c in own else ""
        rows.append(row)
    tmp = os.path.join(out, "labels.csv.part")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["study_uid"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(out, "labels.csv"))
    tmp = os.path.join(out, "findings.jsonl.part")
    with open(tmp, "w") as fh:
        for r in records:
            keep = {k: v for k, v in r.items() if not k.startswith("_")}
            fh.write(json.dumps(keep) + "\n")
    os.replace(tmp, os.path.join(out, "findings.jsonl"))
    os.makedirs(os.path.join(out, "reports"), exist_ok=True)
    for r in records:
        rep = r["report"]
        with open(os.path.join(out, "reports", f"{r['study_uid']}.txt"), "w") as fh:
            fh.write(f"EXAM: {rep.get('exam_type', '')}\nINDICATION: {r['indication']}\n\nFINDINGS:\n{rep['findings']}\n\n"
                     f"IMPRESSION:\n{rep['impression']}\n")
    import shutil

    tdir = os.path.join(out, "tables")
    os.makedirs(tdir, exist_ok=True)
    src = os.path.join(os.path.dirname(__file__), "tables")
    for f in ("label_acuity.csv", "ct_mri_labels.csv"):
        shutil.copy(os.path.join(src, f), os.path.join(tdir, f))
    write_legend(os.path.join(tdir, "anatomy_labels.csv"), _template())
    with open(os.path.join(tdir, "headline_labels.txt"), "w") as fh:
        fh.write("\n".join(HEADLINE) + "\n")


def summarize(records: list[dict]) -> dict:
    out: dict = {"studies": len(records), "by_split": {}, "headline_test_positives": {}}
    for split, _ in SPLITS:
        out["by_split"][split] = sum(r["split"] == split for r in records)
    for mod in ("CT", "MR"):
        test = [r for r in records if r["split"] == "test" and r["modality"] == mod]
        out["headline_test_positives"][mod] = {h: sum(h in r["labels"] for r in test) for h in HEADLINE}
        out["headline_test_positives"][mod]["_studies"] = len(test)
    return out
