"""Radiologist-style free-text reports and clinical indications from structured findings.

:func:`write_report` turns a list of :class:`Finding` into an exam type, a findings section
and a numbered impression; :func:`indication` writes the one-line clinical question that
would have come with the order. Both draw every choice from the ``numpy.random.Generator``
they are given, so the same findings and the same seed give the same text (no set of
strings is ever iterated, so hash randomisation plays no part).

Wording is varied on purpose (several templates per finding family, synonyms, sizes in mm or
cm) so that a model trained on the reports cannot key on one phrasing. What stays fixed:

* every finding is described with its side and one of :func:`label_phrases` of its label;
* sizes are written as ``"14 mm"`` or ``"1.4 cm"`` (see :func:`format_size`);
* important absent findings are negated (``"No intracranial hemorrhage."``, ``"No midline
  shift."``, ``"The ventricles are normal in size."``) and a negation is never written when
  a present finding, or anything it implies, contradicts it;
* a study without findings gets a normal report;
* the impression is a numbered list, most urgent first;
* no names, dates or times ever appear.

A finding whose label is implied by another finding of the same study (``intracranial_
hemorrhage`` next to ``epidural_hematoma``, ``brain_tumor`` next to ``meningioma``...) is not
described twice: the more specific finding's sentence stands for both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from neurovfm.synth import tables

__all__ = [
    "SIDES",
    "Finding",
    "format_size",
    "indication",
    "label_phrase",
    "label_phrases",
    "write_report",
]

SIDES: tuple[str, ...] = ("left", "right", "bilateral", "midline")


@dataclass
class Finding:
    """One ground-truth finding of a study.

    ``side`` is the side of the lesion (for ``midline_shift`` / ``brain_midline_shift``: the
    direction the midline is pushed to; for ``brain_herniation``: the side of the herniating
    brain). ``size_mm`` is the largest diameter (thickness for extra-axial collections,
    displacement for a displaced fracture, tonsillar descent for a Chiari malformation);
    ``0`` means not measured. ``acuity`` is empty to take it from the label table.
    ``location`` has no article ("left frontal lobe", "third ventricle"); empty takes the
    label's usual site. ``extra`` holds optional details: ``shift_mm``, ``degree``
    ("mild"/"moderate"/"severe"), ``type`` (herniation: "subfalcine", "uncal",
    "transtentorial", "tonsillar"), ``stage`` ("acute"/"subacute"/"chronic" for blood),
    ``level`` (site of obstruction for hydrocephalus), ``count`` (number of lesions).
    """

    label: str
    side: str = "midline"
    size_mm: float = 0.0
    acuity: str = ""
    location: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"Finding.side must be one of {SIDES}, got {self.side!r}")
        if self.acuity and self.acuity not in tables.ACUITY_LEVELS:
            raise ValueError(
                f"Finding.acuity must be one of {tables.ACUITY_LEVELS} or empty, got {self.acuity!r}"
            )
        size = float(self.size_mm)
        if not math.isfinite(size) or size < 0:
            raise ValueError(f"Finding.size_mm must be a finite number >= 0, got {self.size_mm!r}")
        self.size_mm = size
        if self.label not in _SPECS:
            raise ValueError(f"unknown finding label {self.label!r}")
        if self.extra is None:
            self.extra = {}


# --------------------------------------------------------------------------------------------
# label phrases


@dataclass(frozen=True)
class _Spec:
    family: str
    nouns: tuple[str, ...]  # synonyms, canonical first; all lower case unless a proper name
    loc: str = ""  # usual site, no side word and no article
    sized: bool = True
    countable: bool = True
    adj: tuple[str, ...] = ()  # optional qualifiers put before the noun ("acute ", "small ")
    ct: tuple[str, ...] = ()  # optional second sentences on CT
    mr: tuple[str, ...] = ()  # ... on MRI
    mrc: tuple[str, ...] = ()  # ... on MRI with contrast
    tpl: tuple[tuple[str, str], ...] = ()  # (modality or "any", template) replacing the family's
    imp: tuple[str, ...] = ()  # impression templates replacing the family's
    cat: str = "nonspecific"  # indication category


def _s(family: str, nouns, loc: str = "", **kw) -> _Spec:
    if isinstance(nouns, str):
        nouns = (nouns,)
    for k in ("adj", "ct", "mr", "mrc", "imp"):
        if isinstance(kw.get(k), str):
            kw[k] = (kw[k],)
    return _Spec(family, tuple(nouns), loc, **kw)


_ACUTE = ("acute ",)

_FRACTURE_TPL = (
    ("any", "{a_noun} involving {the_loc}{disp}."),
    ("any", "There is {a_noun} through {the_loc}{disp}."),
    ("any", "{a_noun} is present in {the_loc}{disp}."),
    ("CT", "Bone windows demonstrate {a_noun} of {the_loc}{disp}."),
)

_TIP_TPL = (
    ("any", "{a_noun} is present, with its tip {in_loc}."),
    ("any", "There is {a_noun} terminating {in_loc}."),
    ("any", "{a_noun} {in_loc}."),
)

_POSTOP_TPL = (
    ("any", "Status post {noun} involving {the_loc}."),
    ("any", "Changes of prior {noun} involving {the_loc}."),
    ("any", "Findings of {a_noun} involving {the_loc}."),
)

_SPECS: dict[str, _Spec] = {
    # --- blood --------------------------------------------------------------------------
    "intracranial_hemorrhage": _s(
        "bleed", ("intracranial hemorrhage", "intracranial hematoma"), "frontal lobe", adj=_ACUTE,
        ct="The blood products are hyperdense.", mr="Blood products demonstrate susceptibility blooming.",
        cat="bleed"),
    "intraparenchymal_hemorrhage": _s(
        "bleed", ("intraparenchymal hemorrhage", "intraparenchymal hematoma", "parenchymal hemorrhage"),
        "basal ganglia", adj=_ACUTE,
        ct=("The hematoma is hyperdense and well circumscribed.", "The hemorrhage is homogeneously hyperdense."),
        mr=("The hematoma demonstrates blooming on susceptibility-weighted images.",),
        cat="bleed"),
    "brain_contusion": _s(
        "bleed", ("hemorrhagic contusion", "cerebral contusion", "parenchymal contusion"),
        "anterior temporal lobe", adj=("small ", "acute "),
        ct="There is mixed hyperdensity at the site of injury.", mr="There is associated susceptibility signal.",
        cat="trauma"),
    "acute_subdural_hematoma": _s(
        "extra_axial", ("acute subdural hematoma", "acute subdural hemorrhage"), "cerebral convexity",
        ct=("The collection is crescentic and hyperdense.", "The collection is hyperdense and crosses suture lines."),
        cat="trauma"),
    "subacute_chronic_subdural_hematoma": _s(
        "extra_axial",
        ("chronic subdural hematoma", "subacute to chronic subdural hematoma", "mixed-age subdural hematoma"),
        "cerebral convexity",
        ct=("The collection is predominantly hypodense with internal septations.",
            "The collection is of mixed attenuation, with layering dependent hyperdensity."),
        cat="trauma"),
    "subdural_hematoma": _s(
        "extra_axial", ("subdural hematoma", "subdural hemorrhage"), "cerebral convexity",
        mr=("The collection is crescentic and follows blood products on susceptibility-weighted images.",
            "Signal characteristics are compatible with subacute blood products."),
        cat="trauma"),
    "epidural_hematoma": _s(
        "extra_axial", ("epidural hematoma", "epidural hemorrhage"), "temporal convexity",
        ct="The collection is biconvex and does not cross the sutures.",
        mr="The collection is lentiform, with the displaced dura seen as a thin dark line.",
        cat="trauma"),
    "traumatic_subarachnoid_hemorrhage": _s(
        "sah", ("subarachnoid hemorrhage", "traumatic subarachnoid hemorrhage"), "frontal sulci",
        sized=False, countable=False, adj=("small volume ", "trace ", "scattered "),
        mr="There is corresponding sulcal FLAIR hyperintensity.", cat="trauma"),
    "aneurysmal_subarachnoid_hemorrhage": _s(
        "sah", ("diffuse subarachnoid hemorrhage", "subarachnoid hemorrhage"), "basal cisterns",
        sized=False, countable=False, adj=("extensive ", "diffuse ", "dense "),
        ct=("The distribution, centered in the basal cisterns, is suggestive of aneurysmal rupture.",
            "The pattern raises concern for a ruptured aneurysm; CT angiography is recommended."),
        mr="The pattern is suggestive of aneurysmal rupture.", cat="sah"),
    "intraventricular_hemorrhage": _s(
        "ivh", ("intraventricular hemorrhage", "intraventricular blood"),
        "occipital horns of the lateral ventricles", sized=False, countable=False,
        adj=("small volume ", "layering ", ""), cat="bleed"),
    "scalp_hemorrhage_hematoma": _s(
        "mass", ("scalp hematoma", "subgaleal hematoma", "scalp soft tissue hematoma"), "parietal scalp",
        ct="There is associated soft tissue swelling.", cat="trauma"),
    # --- ischemia ------------------------------------------------------------------------
    "acute_ischemic_stroke": _s(
        "acute_infarct", ("acute infarct", "acute ischemic infarct", "acute ischemic stroke"),
        "middle cerebral artery territory",
        ct="There is associated sulcal effacement.", mr="Corresponding FLAIR signal is mild.",
        cat="stroke"),
    "lacunar_stroke": _s(
        "lacune", ("lacunar infarct", "lacunar infarction", "lacune"), "thalamus", cat="chronic"),
    "chronic_ischemic_stroke": _s(
        "chronic_infarct", ("chronic infarct", "remote infarct", "old infarct"),
        "middle cerebral artery territory", cat="chronic"),
    "encephalomalacia_gliosis": _s(
        "chronic_infarct", ("encephalomalacia", "area of encephalomalacia and gliosis", "focal gliosis"),
        "frontal lobe", countable=False, cat="chronic"),
    "large_vessel_occlusion": _s(
        "vascular", ("large vessel occlusion", "proximal arterial occlusion"), "middle cerebral artery",
        sized=False,
        tpl=(("CT", "Hyperdensity of the {place} (hyperdense vessel sign), concerning for {a_noun}."),
             ("CT", "There is a hyperdense {place}, suspicious for {a_noun}."),
             ("MR", "Loss of the normal flow void in the {place}, compatible with {a_noun}."),
             ("any", "Findings suggest {a_noun} involving the {place}.")),
        imp=("{np_ns} of the {place}.", "Findings concerning for {np_ns} involving the {place}."),
        cat="stroke"),
    "arterial_dissection": _s(
        "vascular", ("arterial dissection", "dissection"), "cervical internal carotid artery", sized=False,
        tpl=(("any", "Findings compatible with {a_noun} of the {place}."),
             ("any", "Crescentic mural thickening of the {place}, suspicious for {a_noun}."),
             ("MR", "Crescentic T1 hyperintense intramural signal in the {place}, consistent with {a_noun}.")),
        imp=("{np_ns} of the {place}.", "Suspected {np_ns}, {place}."), cat="dissection"),
    "cerebral_venous_sinus_thrombosis": _s(
        "vascular", ("venous sinus thrombosis", "dural venous sinus thrombosis", "cerebral venous sinus thrombosis"),
        "transverse sinus", sized=False, countable=False,
        tpl=(("CT", "Hyperdensity of the {place}, concerning for {noun}."),
             ("CT", "The {place} is expanded and hyperdense, compatible with {noun}."),
             ("MR", "Loss of the normal flow void in the {place}, consistent with {noun}."),
             ("any", "Findings of {noun} involving the {place}.")),
        imp=("{np_ns} involving the {place}.",), cat="cvst"),
    "venous_sinus_thrombosis": _s(
        "vascular", ("venous sinus thrombosis", "dural venous sinus thrombosis", "cerebral venous thrombosis"),
        "transverse sinus", sized=False, countable=False,
        tpl=(("MR", "Loss of the normal flow void in the {place}, consistent with {noun}."),
             ("MR", "Intraluminal signal abnormality in the {place}, compatible with {noun}."),
             ("any", "Findings of {noun} involving the {place}.")),
        imp=("{np_ns} involving the {place}.",), cat="cvst"),
    "moya_moya_disease": _s(
        "vascular", ("moyamoya vasculopathy", "moyamoya disease", "moyamoya pattern"),
        "supraclinoid internal carotid arteries", sized=False, countable=False,
        tpl=(("any", "Narrowing of the {place} with prominent collateral vessels, consistent with {noun}."),
             ("any", "Findings of {noun}, with attenuation of the {place} and basal collaterals.")),
        imp=("{np_ns} involving the {place}.",), cat="vascular"),
    "intracranial_atherosclerosis": _s(
        "vascular", ("intracranial atherosclerosis", "intracranial atherosclerotic disease", "atherosclerotic calcification"),
        "cavernous internal carotid arteries", sized=False, countable=False, adj=("mild ", "moderate "),
        tpl=(("any", "{adjp}{noun} involving the {place}."),
             ("any", "There is {adjp}{noun} of the {place}.")),
        imp=("{adjp}{noun} of the {place}.",), cat="chronic"),
    "carotid_cavernous_fistula": _s(
        "vascular", ("carotid-cavernous fistula", "carotid cavernous fistula"), "cavernous sinus", sized=False,
        tpl=(("any", "Enlargement of the {place} and ipsilateral superior ophthalmic vein, concerning for {a_noun}."),
             ("any", "Findings suspicious for {a_noun} involving the {place}.")),
        imp=("Suspected {np_ns} involving the {place}.",), cat="vascular"),
    # --- tumours and masses --------------------------------------------------------------
    "intra_axial_brain_tumor": _s(
        "mass", ("intra-axial mass", "intra-axial neoplasm", "intra-axial tumor"), "frontal lobe",
        ct=("The lesion is heterogeneous in attenuation.", "The mass is hypodense with ill-defined margins."),
        cat="tumor"),
    "extra_axial_brain_tumor": _s(
        "mass", ("extra-axial mass", "extra-axial neoplasm", "extra-axial tumor"), "frontal convexity",
        ct=("The lesion is dural based and mildly hyperdense.", "There is associated hyperostosis of the adjacent bone."),
        cat="tumor"),
    "brain_tumor": _s(
        "mass", ("intracranial mass", "intracranial neoplasm", "brain tumor"), "frontal lobe",
        mr="The lesion is heterogeneous on T2-weighted images.", cat="tumor"),
    "brain_metastasis": _s(
        "mass", ("metastasis", "metastatic lesion", "metastatic deposit"), "cerebellar hemisphere",
        mrc="The lesion demonstrates ring enhancement.", cat="metastasis"),
    "glioma": _s(
        "mass", ("glioma", "infiltrative glioma", "glial neoplasm"), "frontal lobe",
        mr="The lesion is T2/FLAIR hyperintense and infiltrative.", cat="glioma"),
    "high_grade_glioma": _s(
        "mass", ("high-grade glioma", "high grade glial neoplasm", "mass compatible with high-grade glioma"),
        "temporal lobe",
        mr="There is central necrosis.", mrc="There is thick irregular peripheral enhancement.", cat="glioma"),
    "low_grade_glioma": _s(
        "mass", ("low-grade glioma", "low grade glial neoplasm", "mass compatible with low-grade glioma"),
        "insula", mr="The lesion is homogeneously T2/FLAIR hyperintense.", cat="glioma"),
    "brainstem_glioma": _s(
        "mass", ("brainstem glioma", "expansile brainstem glioma"), "pons",
        mr="The lesion expands the brainstem and is T2 hyperintense.", cat="glioma"),
    "meningioma": _s(
        "mass", ("meningioma", "dural-based meningioma"), "frontal convexity",
        mrc="There is homogeneous enhancement with a dural tail.",
        mr="The lesion is isointense to gray matter with a CSF cleft.", cat="meningioma"),
    "lymphoma": _s(
        "mass", ("lymphoma", "mass compatible with lymphoma", "lesion suspicious for lymphoma"),
        "periventricular white matter", mr="The lesion demonstrates restricted diffusion.",
        mrc="There is homogeneous enhancement.", cat="tumor"),
    "pituitary_tumor": _s(
        "mass", ("pituitary mass", "pituitary adenoma", "pituitary tumor"), "sella",
        mr="The optic chiasm is elevated.", cat="pituitary"),
    "pineal_tumor": _s(
        "mass", ("pineal region mass", "pineal tumor", "pineal neoplasm"), "pineal region", cat="posterior"),
    "posterior_fossa_tumors": _s(
        "mass", ("posterior fossa mass", "posterior fossa tumor", "posterior fossa neoplasm"),
        "cerebellar hemisphere", cat="posterior"),
    "pediatric_posterior_fossa_tumor": _s(
        "mass", ("posterior fossa mass", "posterior fossa tumor", "posterior fossa neoplasm"),
        "fourth ventricle", mr="The lesion demonstrates restricted diffusion.", cat="posterior"),
    "intraventricular_tumor": _s(
        "mass", ("intraventricular mass", "intraventricular tumor", "intraventricular neoplasm"),
        "atrium of the lateral ventricle", cat="posterior"),
    "craniopharyngioma": _s(
        "mass", ("craniopharyngioma", "mass compatible with craniopharyngioma"), "suprasellar cistern",
        ct="There are peripheral calcifications.", mr="The lesion has cystic and solid components.",
        cat="pituitary"),
    "chordoma_chondrosarcoma": _s(
        "mass", ("skull base mass", "expansile skull base mass"), "clivus",
        ct="Differential considerations include chordoma and chondrosarcoma.",
        mr="The lesion is markedly T2 hyperintense; differential includes chordoma and chondrosarcoma.",
        cat="tumor"),
    "schwannoma": _s(
        "mass", ("schwannoma", "vestibular schwannoma"), "internal auditory canal",
        mrc="The lesion enhances and extends into the cerebellopontine angle.", cat="schwannoma"),
    "nerve_tumor": _s(
        "mass", ("nerve sheath tumor", "cranial nerve sheath tumor", "cranial nerve tumor"),
        "cerebellopontine angle", cat="schwannoma"),
    "skull_bone_tumor": _s(
        "mass", ("calvarial lesion", "osseous calvarial lesion", "skull lesion"), "parietal bone",
        ct="The lesion is lytic with a narrow zone of transition.", cat="bone"),
    "orbital_tumor": _s(
        "mass", ("orbital mass", "orbital tumor", "orbital neoplasm"), "intraconal orbit", cat="orbit"),
    "head_neck_tumor": _s(
        "mass", ("head and neck mass", "soft tissue mass", "head and neck tumor"), "nasopharynx", cat="neck"),
    "spine_tumor": _s(
        "mass", ("spinal lesion", "spinal mass", "spine tumor"), "upper cervical spine", cat="spine"),
    "head_neck_enlarged_lymph_node": _s(
        "mass", ("enlarged lymph node", "enlarged cervical lymph node", "prominent lymph node"),
        "level II cervical chain", cat="neck"),
    "thyroid_nodule": _s("mass", ("thyroid nodule", "incidental thyroid nodule"), "thyroid lobe", cat="incidental"),
    "parathyroid_nodule": _s(
        "mass", ("parathyroid nodule", "parathyroid lesion"), "tracheoesophageal groove", cat="incidental"),
    # --- infection / inflammation --------------------------------------------------------
    "cerebral_abscess": _s(
        "mass", ("cerebral abscess", "brain abscess", "abscess"), "frontal lobe",
        ct="The lesion has a hypodense center and a thin isodense rim.",
        mr="The lesion demonstrates central restricted diffusion.", mrc="There is smooth rim enhancement.",
        cat="infection"),
    "brain_abscess": _s(
        "mass", ("brain abscess", "cerebral abscess", "abscess"), "frontal lobe",
        mr="The lesion demonstrates central restricted diffusion.", mrc="There is smooth rim enhancement.",
        cat="infection"),
    "subdural_hygroma_effusions": _s(
        "extra_axial", ("subdural hygroma", "subdural effusion", "subdural CSF-density collection"), "frontal convexity",
        ct="The collection follows CSF attenuation.", mr="The collection follows CSF signal on all sequences.",
        cat="chronic"),
    "cerebral_subdural_empyema": _s(
        "extra_axial", ("subdural empyema", "subdural purulent collection"), "frontal convexity",
        ct="The collection is slightly hyperdense to CSF.", cat="infection"),
    "viral_encephalitis": _s(
        "diffuse", ("encephalitis", "viral encephalitis"), "medial temporal lobe", sized=False, countable=False,
        tpl=(("any", "T2/FLAIR hyperintensity and swelling of {the_loc}, compatible with {noun}."),
             ("any", "Cortical signal abnormality {in_loc}, suggestive of {noun}."),
             ("any", "Findings {in_loc} are concerning for {noun}.")),
        mr="There is associated restricted diffusion.", cat="encephalitis"),
    "neurosarcoidosis": _s(
        "diffuse", ("neurosarcoidosis", "neurosarcoid"), "basal leptomeninges",
        sized=False, countable=False,
        tpl=(("any", "Nodular leptomeningeal thickening along {the_loc}, compatible with {noun}."),
             ("any", "{noun} involving {the_loc}.")),
        cat="demyelination"),
    "peritonsillar_abscess": _s(
        "mass", ("peritonsillar abscess", "peritonsillar fluid collection"), "peritonsillar space", cat="throat"),
    "pharyngeal_abscess": _s(
        "mass", ("retropharyngeal abscess", "pharyngeal abscess"), "retropharyngeal space", cat="throat"),
    "sinusitis": _s(
        "ent", ("paranasal sinus mucosal thickening", "sinusitis", "sinus mucosal disease"), "maxillary sinus",
        sized=False, countable=False, adj=("mild ", "moderate ", ""),
        ct="There is an air-fluid level.", cat="ent"),
    "mastoid_effusion": _s(
        "ent", ("mastoid effusion", "mastoid fluid", "opacification of the mastoid air cells"), "mastoid",
        sized=False, countable=False, cat="ent"),
    "otitis_media": _s(
        "ent", ("middle ear opacification", "otitis media", "middle ear effusion"), "middle ear cavity",
        sized=False, countable=False, cat="ear"),
    "cholesteatoma": _s(
        "mass", ("cholesteatoma", "mass compatible with cholesteatoma"), "middle ear cavity",
        ct="There is erosion of the ossicles and scutum.", mr="The lesion demonstrates restricted diffusion.",
        cat="ear"),
    "airway_obstruction": _s(
        "diffuse", ("airway narrowing", "airway obstruction", "narrowing of the upper airway"), "oropharynx",
        sized=False, countable=False,
        tpl=(("any", "Marked {noun} at the level of {the_loc}."),
             ("any", "There is {noun} at the level of {the_loc}.")),
        imp=("Marked {noun} at the level of {the_loc}.",), cat="throat"),
    # --- mass effect, edema, herniation, CSF spaces --------------------------------------
    "cerebral_edema": _s(
        "edema", ("vasogenic edema", "cerebral edema", "parenchymal edema"), "frontal lobe",
        countable=False, cat="edema"),
    "brain_mass_effect": _s("mass_effect", ("mass effect", "regional mass effect"), "lateral ventricle",
                            sized=False, countable=False, adj=("mild ", "moderate ", "local ", ""), cat="edema"),
    "midline_shift": _s("shift", ("midline shift", "shift of the midline structures"), cat="edema"),
    "brain_midline_shift": _s("shift", ("midline shift", "shift of the midline structures"), cat="edema"),
    "brain_herniation": _s("herniation", ("herniation",), sized=False, cat="edema"),
    "ventriculomegaly": _s(
        "ventricles", ("ventriculomegaly", "ventricular enlargement", "enlarged ventricles"),
        "lateral ventricles", sized=False, countable=False, adj=("mild ", "moderate ", ""), cat="ventricles"),
    "obstructive_hydrocephalus": _s(
        "ventricles", ("obstructive hydrocephalus", "noncommunicating hydrocephalus"),
        "lateral and third ventricles", sized=False, countable=False, adj=("moderate ", "marked ", ""),
        cat="hydrocephalus"),
    "hydrocephalus_ex_vacuo": _s(
        "ventricles", ("ex vacuo ventricular dilatation", "hydrocephalus ex vacuo", "ex vacuo dilatation"),
        "lateral ventricles", sized=False, countable=False, cat="chronic"),
    "transependymal_flow": _s(
        "diffuse", ("transependymal flow", "transependymal CSF flow"), "periventricular white matter",
        sized=False, countable=False,
        tpl=(("CT", "Periventricular hypoattenuation in {the_loc}, compatible with {noun}."),
             ("MR", "Smooth periventricular FLAIR hyperintensity in {the_loc}, compatible with {noun}."),
             ("any", "There is {noun} {in_loc}.")),
        cat="hydrocephalus"),
    "slit_ventricle": _s(
        "diffuse", ("slit-like ventricles", "slit ventricles"), "lateral ventricles", sized=False, countable=False,
        tpl=(("any", "Small, slit-like configuration of {the_loc}, compatible with {noun}."),
             ("any", "Diminutive {place}, consistent with {noun}.")),
        cat="shunt"),
    "intracranial_hypotension": _s(
        "diffuse", ("intracranial hypotension", "spontaneous intracranial hypotension"), "cerebral convexities",
        sized=False, countable=False,
        tpl=(("any", "Diffuse smooth pachymeningeal thickening over {the_loc} with sagging of the brainstem, compatible with {noun}."),
             ("any", "Sagging of the brainstem and pachymeningeal thickening along {the_loc}, suggestive of {noun}.")),
        cat="hypotension"),
    "pneumocephalus": _s(
        "air", ("pneumocephalus", "intracranial air"), "frontal convexity", sized=False, countable=False,
        adj=("small volume ", "trace ", "moderate "), cat="air"),
    "orbital_emphysema": _s(
        "air", ("orbital emphysema", "intraorbital air"), "extraconal orbit", sized=False, countable=False,
        adj=("small volume ", ""), cat="trauma"),
    # --- white matter, atrophy, degeneration ---------------------------------------------
    "cerebral_atrophy": _s("atrophy", ("cerebral atrophy", "generalized cerebral volume loss", "parenchymal volume loss"),
                           "cerebral hemispheres", sized=False, countable=False, cat="chronic"),
    "small_vessel_ischemic_disease": _s(
        "svd", ("chronic small vessel ischemic disease", "small vessel ischemic disease",
                "chronic microvascular ischemic change"), "periventricular and subcortical white matter",
        sized=False, countable=False, cat="chronic"),
    "multiple_sclerosis": _s(
        "ms", ("demyelinating disease", "multiple sclerosis"), "periventricular white matter",
        sized=False, countable=False, mrc="A few lesions demonstrate enhancement, suggesting active demyelination.",
        cat="demyelination"),
    "neuromyelitis_optica": _s(
        "diffuse", ("neuromyelitis optica spectrum disorder", "neuromyelitis optica"), "optic nerve",
        sized=False, countable=False,
        tpl=(("any", "Longitudinally extensive T2 hyperintensity of {the_loc}, compatible with {noun}."),
             ("any", "Signal abnormality involving {the_loc} and the area postrema, suggestive of {noun}.")),
        cat="demyelination"),
    "diffuse_axonal_injury": _s(
        "diffuse", ("diffuse axonal injury", "traumatic axonal injury", "shear injury"), "gray-white matter junction",
        sized=False, countable=False,
        tpl=(("CT", "Punctate hyperdensities at {the_loc} and corpus callosum, suspicious for {noun}."),
             ("MR", "Multiple foci of susceptibility at {the_loc} and splenium of the corpus callosum, consistent with {noun}."),
             ("any", "Findings {in_loc} are compatible with {noun}.")),
        cat="trauma"),
    "basal_ganglia_calcification": _s(
        "calc", ("basal ganglia calcification", "basal ganglia mineralization"), sized=False, countable=False,
        tpl=(("any", "{side_adj} {noun}, likely physiologic."),
             ("any", "There is {side_adj} {noun}."),
             ("any", "{side_adj} {noun} is noted, a common incidental finding.")),
        imp=("{side_adj} {noun}.",), cat="incidental"),
    "spinal_degenerative_changes": _s(
        "diffuse", ("degenerative changes of the cervical spine", "cervical spondylosis", "spinal degenerative changes"),
        "upper cervical spine", sized=False, countable=False,
        tpl=(("any", "{noun} {in_loc}."), ("any", "Partially imaged {noun} {in_loc}.")),
        imp=("{noun} {in_loc}.",), cat="spine"),
    "spine_syrinx": _s("mass", ("syrinx", "cervical cord syrinx"), "upper cervical cord", cat="spine"),
    # --- congenital / developmental ------------------------------------------------------
    "chiari_malformation": _s(
        "chiari", ("Chiari I malformation", "Chiari malformation"), "foramen magnum",
        tpl=(("any", "Cerebellar tonsillar ectopia at the {place}{tonsil}, consistent with {a_noun}."),
             ("any", "{a_noun} with low-lying cerebellar tonsils at the {place}{tonsil}."),
             ("any", "The cerebellar tonsils are pointed and extend below the {place}{tonsil}, compatible with {a_noun}.")),
        imp=("{np_ns}{side_tag}{isize}.",), cat="congenital"),
    "dandy_walker_malformation": _s(
        "diffuse", ("Dandy-Walker malformation", "Dandy-Walker continuum malformation"), "posterior fossa",
        sized=False,
        tpl=(("any", "Cystic dilatation of the fourth ventricle with vermian hypoplasia in the {place}, consistent with {a_noun}."),
             ("any", "{a_noun} of the {place}.")),
        cat="congenital"),
    "dysgenesis_corpus_callosum": _s(
        "diffuse", ("dysgenesis of the corpus callosum", "callosal dysgenesis", "corpus callosum dysgenesis"),
        "", sized=False, countable=False,
        tpl=(("any", "{noun} {in_loc}, with parallel configuration of the lateral ventricles."),
             ("any", "There is {noun} {in_loc}, with colpocephaly."),
             ("any", "{noun} is present {in_loc}.")),
        imp=("{noun}{side_tag}.",), cat="congenital"),
    "heterotopia": _s(
        "diffuse", ("gray matter heterotopia", "heterotopic gray matter", "nodular heterotopia"),
        "periventricular white matter", sized=False, countable=False,
        tpl=(("any", "Nodules isointense to gray matter along {the_loc}, consistent with {noun}."),
             ("any", "{noun} {in_loc}.")),
        cat="congenital"),
    "pachygyria_lissencephaly": _s(
        "diffuse", ("pachygyria", "lissencephaly-pachygyria spectrum malformation"), "cerebral hemispheres",
        sized=False, countable=False,
        tpl=(("any", "Broad, simplified gyri with cortical thickening in {the_loc}, consistent with {noun}."),
             ("any", "{noun} involving {the_loc}.")),
        cat="congenital"),
    "schizencephaly": _s(
        "diffuse", ("schizencephaly", "schizencephalic cleft"), "frontal lobe", sized=False, countable=False,
        tpl=(("any", "A gray matter lined cleft extending from the ventricle to the cortical surface {in_loc}, consistent with {noun}."),
             ("any", "{noun} {in_loc}.")),
        cat="congenital"),
    "cephaloceles": _s("mass", ("cephalocele", "encephalocele"), "occipital bone", cat="congenital"),
    # --- cysts and normal variants -------------------------------------------------------
    "arachnoid_cyst": _s("variant", ("arachnoid cyst",), "middle cranial fossa", cat="variant"),
    "mega_cisterna_magna": _s("variant", ("mega cisterna magna", "prominent cisterna magna"), "posterior fossa",
                              sized=False, cat="variant"),
    "cavum_septum_pellucidum": _s("variant", ("cavum septum pellucidum",), sized=False, cat="variant"),
    "pineal_cyst": _s("variant", ("pineal cyst",), "pineal gland", cat="variant"),
    "colloid_cyst": _s("mass", ("colloid cyst",), "anterior third ventricle",
                       ct="The lesion is hyperdense.", cat="posterior"),
    "rathkes_cleft_cyst": _s("mass", ("Rathke cleft cyst", "Rathke's cleft cyst"), "pars intermedia",
                             cat="pituitary"),
    "epidermoid_cyst": _s("mass", ("epidermoid cyst", "epidermoid"), "cerebellopontine angle",
                          mr="The lesion demonstrates restricted diffusion.", cat="schwannoma"),
    "intracranial_epidermoid_dermoid_cyst": _s(
        "mass", ("epidermoid cyst", "dermoid cyst", "epidermoid or dermoid cyst"), "cerebellopontine angle",
        cat="schwannoma"),
    # --- vascular lesions ----------------------------------------------------------------
    "intracranial_aneurysm": _s("mass", ("intracranial aneurysm", "saccular aneurysm", "aneurysm"),
                                "middle cerebral artery bifurcation", cat="aneurysm"),
    "cerebral_aneurysm": _s("mass", ("cerebral aneurysm", "saccular aneurysm", "aneurysm"),
                            "middle cerebral artery bifurcation", cat="aneurysm"),
    "cerebral_arteriovenous_malformation": _s(
        "mass", ("arteriovenous malformation", "AVM"), "parietal lobe",
        ct="There are associated serpiginous calcifications.", cat="avm"),
    "arteriovenous_malformation": _s(
        "mass", ("arteriovenous malformation", "AVM"), "parietal lobe",
        mr="There is a tangle of serpiginous flow voids.", cat="avm"),
    "cavernous_malformation_cavernoma": _s(
        "mass", ("cavernous malformation", "cavernoma"), "frontal lobe",
        mr="The lesion has a popcorn appearance with a complete hemosiderin rim.", cat="avm"),
    # --- trauma (bone, orbit, face, foreign body) ----------------------------------------
    "displaced_skull_fracture": _s(
        "fracture", ("displaced skull fracture", "depressed skull fracture", "displaced calvarial fracture"),
        "parietal bone", tpl=_FRACTURE_TPL, cat="trauma"),
    "nondisplaced_skull_fracture": _s(
        "fracture", ("nondisplaced skull fracture", "nondisplaced linear skull fracture", "nondisplaced calvarial fracture"),
        "parietal bone", sized=False, tpl=_FRACTURE_TPL, cat="trauma"),
    "skull_base_fracture": _s(
        "fracture", ("skull base fracture", "basilar skull fracture"), "temporal bone", sized=False,
        tpl=_FRACTURE_TPL, cat="trauma"),
    "craniofacial_injury": _s(
        "fracture", ("craniofacial fracture", "facial bone fracture", "craniofacial injury"),
        "zygomaticomaxillary complex", sized=False, tpl=_FRACTURE_TPL, cat="face"),
    "orbital_trauma": _s(
        "fracture", ("orbital fracture", "orbital wall fracture", "orbital injury"), "orbital floor", sized=False,
        tpl=_FRACTURE_TPL, cat="face"),
    "cerebral_foreign_body": _s(
        "mass", ("intracranial foreign body", "metallic foreign body", "retained foreign body"), "frontal lobe",
        ct="There is associated streak artifact.", cat="trauma"),
    # --- surgery and devices --------------------------------------------------------------
    "postsurgical_changes": _s(
        "postop", ("postsurgical changes", "postoperative changes"), "frontal region", sized=False, countable=False,
        tpl=(("any", "{noun} {in_loc}."), ("any", "There are {noun} {in_loc}."), ("any", "{noun} are noted {in_loc}.")),
        imp=("{noun} {in_loc}.",), cat="postop"),
    "craniotomy": _s("postop", ("craniotomy",), "frontotemporal calvarium", sized=False,
                     tpl=_POSTOP_TPL, cat="postop"),
    "craniotomy_craniectomy": _s("postop", ("craniotomy", "craniectomy"), "frontotemporal calvarium",
                                 sized=False, tpl=_POSTOP_TPL, cat="postop"),
    "burr_hole": _s("postop", ("burr hole",), "frontal bone", sized=False, tpl=_POSTOP_TPL, cat="postop"),
    "cranioplasty_implant": _s("postop", ("cranioplasty", "cranioplasty implant"), "frontoparietal calvarium",
                               sized=False, tpl=_POSTOP_TPL, cat="postop"),
    "resection_cavity": _s("mass", ("resection cavity", "surgical resection cavity", "postoperative cavity"),
                           "frontal lobe", cat="postop_tumor"),
    "tumor_resection_cavity": _s("mass", ("resection cavity", "tumor resection cavity", "surgical resection cavity"),
                                 "frontal lobe", mr="There is thin linear enhancement along the margins.",
                                 cat="postop_tumor"),
    "catheter": _s("device", ("ventricular catheter", "ventriculostomy catheter", "shunt catheter"),
                   "frontal horn of the lateral ventricle", sized=False, tpl=_TIP_TPL, cat="shunt"),
    "brain_lead": _s("device", ("deep brain stimulator lead", "deep brain stimulation electrode"), "thalamus",
                     sized=False, tpl=_TIP_TPL, cat="dbs"),
    "intracranial_pressure_monitor": _s(
        "device", ("intracranial pressure monitor", "intraparenchymal pressure monitor"), "frontal lobe",
        sized=False, tpl=_TIP_TPL, cat="icu"),
    "aneurysm_clip": _s(
        "device", ("aneurysm clip", "surgical aneurysm clip"), "middle cerebral artery bifurcation", sized=False,
        ct="There is associated streak artifact.", mr="There is associated susceptibility artifact.",
        cat="aneurysm_treated"),
    "aneurysm_coil": _s(
        "device", ("aneurysm coil mass", "endovascular coil pack"), "anterior communicating artery region",
        sized=False, ct="There is associated streak artifact.", cat="aneurysm_treated"),
    "embolization_material": _s(
        "device", ("embolization material", "embolic material"), "parietal lobe", sized=False, countable=False,
        ct="There is associated streak artifact.", cat="avm"),
}

# families whose findings may follow "No acute intracranial abnormality." in an impression
_QUIET_FAMILIES = {"atrophy", "svd", "variant", "ent", "postop", "device", "chronic_infarct", "lacune", "calc"}
_EDEMA_FAMILIES = {"bleed", "mass"}


def label_phrases(label: str) -> tuple[str, ...]:
    """The phrases that name ``label`` in a report (canonical first); one always appears."""
    try:
        return _SPECS[label].nouns
    except KeyError:
        raise ValueError(f"unknown finding label {label!r}") from None


def label_phrase(label: str) -> str:
    """The canonical phrase of ``label`` ("acute_subdural_hematoma" -> "acute subdural hematoma")."""
    return label_phrases(label)[0]


# --------------------------------------------------------------------------------------------
# small text helpers


def _half_up(x: float, ndigits: int = 0) -> float:
    q = 10.0**ndigits
    return math.floor(x * q + 0.5 + 1e-9) / q


def format_size(size_mm: float, unit: str = "mm") -> str:
    """``"14 mm"`` / ``"6.5 mm"`` (unit ``"mm"``) or ``"1.4 cm"`` (unit ``"cm"``), rounded half up.

    Millimetres are whole from 10 mm up and keep one decimal below; centimetres keep one
    decimal. The centimetre value is the whole-millimetre value over ten.
    """
    size_mm = float(size_mm)
    if unit == "cm":
        return f"{_half_up(size_mm) / 10:.1f} cm"
    if unit != "mm":
        raise ValueError(f"unit must be 'mm' or 'cm', got {unit!r}")
    if size_mm >= 10:
        return f"{int(_half_up(size_mm))} mm"
    v = _half_up(size_mm, 1)
    return (f"{v:.1f}".rstrip("0").rstrip(".") or "0") + " mm"


def _article(phrase: str) -> str:
    word = phrase.split(" ", 1)[0].lower()
    if word[:1].isdigit():
        whole = re.match(r"\d+", word).group(0)
        if whole.startswith("8") or whole in ("11", "18") or (len(whole) in (5, 6) and whole[:2] in ("11", "18")):
            return "an"
        return "a"
    if word.startswith(("uni", "use", "eu", "one")) or word == "u":
        return "a"
    if word in ("avm", "mri", "mr", "ct") or word.startswith(("honest", "hour")):
        return "an"
    return "an" if word[:1] in "aeiou" else "a"


def _cap(s: str) -> str:
    for i, ch in enumerate(s):
        if ch.isalpha():
            return s[:i] + ch.upper() + s[i + 1:]
        if not ch.isspace() and ch not in "(\"'":
            return s
    return s


def _tidy(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+([,.])", r"\1", s)
    s = re.sub(r",\s*,", ",", s)
    s = re.sub(r"\.\.+", ".", s)
    return _cap(s)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


_SIDE_RE = re.compile(r"\b(left|right|bilateral|midline)\b", re.IGNORECASE)


def _place(location: str, side: str) -> str:
    """The location with its side word: 'basal ganglia' + left -> 'left basal ganglia'."""
    loc = re.sub(r"^\s*the\s+", "", location.strip(), flags=re.IGNORECASE)
    if not loc:
        return ""
    found = [m.group(1).lower() for m in _SIDE_RE.finditer(loc)]
    if side in found:
        return loc
    if found:
        return _SIDE_RE.sub(side, loc, count=1)
    return f"{side} {loc}"


_SIDE_ONLY = {"left": "on the left", "right": "on the right", "bilateral": "bilaterally", "midline": "in the midline"}


# --------------------------------------------------------------------------------------------
# family templates: (modality or "any", template)

_GENERIC = (
    ("any", "{np_s} {in_loc}{tail}."),
    ("any", "There is {np_s} {in_loc}{tail}."),
    ("any", "{a_noun}{meas} is seen {in_loc}{tail}."),
    ("any", "{in_loc}, there is {np_s}{tail}."),
    ("any", "{a_noun} is identified {in_loc}{meas_c}{tail}."),
)

_FAMILY_TPL: dict[str, tuple[tuple[str, str], ...]] = {
    "mass": _GENERIC,
    "diffuse": _GENERIC,
    "bleed": _GENERIC + (
        ("CT", "Hyperdense {noun_adj}{meas} {in_loc}{tail}."),
        ("MR", "{np_s} {in_loc}, with susceptibility artifact on gradient-echo images{tail}."),
    ),
    "extra_axial": (
        ("any", "{np_s} along {the_loc}."),
        ("any", "There is {a_noun} along {the_loc}{meas_t}."),
        ("any", "{a_noun} overlies {the_loc}{meas_t}."),
        ("any", "{a_noun} is present along {the_loc}{meas_t}."),
    ),
    "sah": (
        ("any", "{adjp}{noun} {in_loc}."),
        ("any", "There is {adjp}{noun} {in_loc}."),
        ("any", "{adjp}{noun} is seen {in_loc}."),
    ),
    "ivh": (
        ("any", "{adjp}{noun} {in_loc}."),
        ("any", "There is {adjp}{noun} within {the_loc}."),
        ("any", "{adjp}{noun} is seen within {the_loc}."),
    ),
    "acute_infarct": _GENERIC[:3] + (
        ("CT", "Hypoattenuation with loss of gray-white matter differentiation {in_loc}{meas_c}, consistent with {a_noun}."),
        ("CT", "{np_s} {in_loc}, with loss of gray-white matter differentiation."),
        ("MR", "Restricted diffusion with corresponding ADC hypointensity {in_loc}{meas_c}, consistent with {a_noun}."),
        ("MR", "{np_s} {in_loc}, with reduced diffusivity and FLAIR hyperintensity."),
    ),
    "lacune": _GENERIC[:3] + (
        ("CT", "Small well-defined hypodensity {in_loc}{meas_c}, compatible with {a_noun}."),
        ("MR", "Small focus of T2/FLAIR hyperintensity {in_loc}{meas_c}, compatible with {a_noun}."),
    ),
    "chronic_infarct": _GENERIC[:3] + (
        ("CT", "Well-circumscribed hypoattenuation {in_loc}{meas_c}, compatible with {a_noun}."),
        ("MR", "{np_s} {in_loc}, with associated volume loss and T2/FLAIR hyperintensity."),
    ),
    "variant": (
        ("any", "{np_s} {in_loc}{tail}, a normal variant."),
        ("any", "Incidental {noun} {in_loc}{meas_c}{tail}."),
        ("any", "{np_s} is noted {in_loc}, likely incidental."),
        ("any", "There is {np_s} {in_loc}, a normal anatomic variant."),
    ),
    "edema": (
        ("CT", "Hypoattenuation {in_loc}{meas_span}, consistent with {noun}."),
        ("MR", "T2/FLAIR hyperintense signal {in_loc}{meas_span}, consistent with {noun}."),
        ("any", "There is {noun} {in_loc}{meas_span}."),
        ("any", "{noun} is present {in_loc}{meas_span}."),
    ),
    "mass_effect": (
        ("any", "There is {adjp}{noun} with effacement of {the_loc}."),
        ("any", "{adjp}{noun} is present, with effacement of {the_loc}."),
        ("any", "{adjp}{noun} on {the_loc}, with sulcal effacement."),
    ),
    "shift": (("any", "{shift_sentence}"),),
    "herniation": (
        ("any", "There is {side_adj} {htype} herniation{hdetail}."),
        ("any", "{side_adj} {htype} herniation{hdetail} is present."),
        ("any", "Findings of {side_adj} {htype} herniation{hdetail}."),
    ),
    "ventricles": (
        ("any", "Enlargement of {the_loc}, consistent with {adjp}{noun}{level}."),
        ("any", "{adjp}{noun} with enlargement of {the_loc}{level}."),
        ("any", "There is {adjp}{noun} involving {the_loc}{level}."),
    ),
    "atrophy": (
        ("any", "{degree} {noun} involving {the_loc}."),
        ("any", "There is {degree} {noun} throughout {the_loc}, with commensurate sulcal prominence."),
        ("any", "{degree} {noun}{focal}."),
    ),
    "svd": (
        ("CT", "{degree} patchy hypoattenuation in {the_loc}, compatible with {noun}."),
        ("CT", "{degree} {noun} {in_loc}."),
        ("MR", "Scattered T2/FLAIR hyperintense foci in {the_loc}, compatible with {degree} {noun}."),
        ("MR", "Punctate and confluent FLAIR hyperintensities in {the_loc}, likely {degree} {noun}."),
        ("any", "There is {degree} {noun} involving {the_loc}."),
    ),
    "ms": (
        ("MR", "Multiple ovoid T2/FLAIR hyperintense lesions in {the_loc}, oriented perpendicular to the lateral ventricles, consistent with {noun}."),
        ("MR", "{count_word} T2/FLAIR hyperintense lesions involving {the_loc} and the corpus callosum, compatible with {noun}."),
        ("CT", "Ill-defined hypoattenuating lesions in {the_loc}, which may reflect {noun}."),
        ("any", "Findings {in_loc} are compatible with {noun}."),
    ),
    "air": (
        ("any", "{adjp}{noun} {in_loc}."),
        ("any", "There is {adjp}{noun} {in_loc}."),
        ("any", "{adjp}{noun} is noted along {the_loc}."),
    ),
    "ent": (
        ("any", "{adjp}{noun} {in_loc}."),
        ("any", "There is {adjp}{noun} involving {the_loc}."),
    ),
    "device": (
        ("any", "{np_s} {in_loc}."),
        ("any", "{a_noun} is present {in_loc}."),
        ("any", "There is {a_noun} {in_loc}."),
    ),
    "postop": _POSTOP_TPL,
}

_GENERIC_IMP = (
    "{np_ns} {in_loc}{isize}.",
    "{pre_place} {np_ns}{isize}.",
    "{np_ns}, {place_or_side}{isize}.",
)

_FAMILY_IMP: dict[str, tuple[str, ...]] = {
    "shift": ("{shift_imp}",),
    "herniation": ("{side_adj} {htype} herniation.",),
    "variant": ("{np_ns} {in_loc}, a normal variant.", "Incidental {noun} {in_loc}."),
    "atrophy": ("{degree} {noun} {in_loc}.", "{degree} {noun}{focal}."),
    "svd": ("{degree} {noun} {in_loc}.", "{degree} {noun}{side_tag}."),
    "ms": ("{noun} {in_loc}.", "Findings compatible with {noun} {in_loc}."),
    "ventricles": ("{adjp}{noun} involving {the_loc}.", "{adjp}{noun}{side_tag}."),
    "sah": ("{adjp}{noun} {in_loc}.",),
    "ivh": ("{adjp}{noun} {in_loc}.",),
    "air": ("{adjp}{noun} {in_loc}.",),
    "ent": ("{adjp}{noun} {in_loc}.",),
    "edema": ("{noun} {in_loc}.",),
    "mass_effect": ("{adjp}{noun} on {the_loc}.",),
    "postop": ("Status post {noun} involving {the_loc}.", "Postoperative {noun}, {place_or_side}."),
    "device": ("{np_ns} {in_loc}.",),
}

_HERNIATION_DETAIL = {
    "subfalcine": (" beneath the falx", " of the cingulate gyrus beneath the falx"),
    "uncal": (" with effacement of the suprasellar cistern", " with medial displacement of the uncus"),
    "transtentorial": (" with effacement of the basal cisterns", " through the tentorial incisura"),
    "tonsillar": (" through the foramen magnum", " with crowding at the foramen magnum"),
}


# --------------------------------------------------------------------------------------------
# negations of absent findings

_ICH = frozenset({
    "intracranial_hemorrhage", "intraparenchymal_hemorrhage", "acute_subdural_hematoma",
    "subacute_chronic_subdural_hematoma", "subdural_hematoma", "epidural_hematoma",
    "traumatic_subarachnoid_hemorrhage", "aneurysmal_subarachnoid_hemorrhage",
    "intraventricular_hemorrhage", "brain_contusion", "diffuse_axonal_injury",
})
_SHIFT = frozenset({"midline_shift", "brain_midline_shift", "brain_herniation"})
_MASS_EFFECT = _SHIFT | {"brain_mass_effect"}
_COLLECTION = frozenset({
    "acute_subdural_hematoma", "subacute_chronic_subdural_hematoma", "subdural_hematoma",
    "epidural_hematoma", "subdural_hygroma_effusions", "cerebral_subdural_empyema", "arachnoid_cyst",
})
_VENTRICLES = frozenset({
    "ventriculomegaly", "obstructive_hydrocephalus", "hydrocephalus_ex_vacuo", "slit_ventricle",
    "transependymal_flow", "cerebral_atrophy", "dandy_walker_malformation", "dysgenesis_corpus_callosum",
})
_INFARCT = frozenset({"acute_ischemic_stroke", "large_vessel_occlusion", "lacunar_stroke"})
_GW_BLUR = frozenset({"cerebral_edema", "viral_encephalitis", "brain_contusion", "diffuse_axonal_injury",
                      "chronic_ischemic_stroke", "encephalomalacia_gliosis"})
_FRACTURE = frozenset({
    "displaced_skull_fracture", "nondisplaced_skull_fracture", "skull_base_fracture", "craniofacial_injury",
    "orbital_trauma", "cerebral_foreign_body", "skull_bone_tumor", "pneumocephalus", "orbital_emphysema",
})
_CALVARIUM_ALTERED = _FRACTURE | {
    "craniotomy", "craniotomy_craniectomy", "burr_hole", "cranioplasty_implant", "aneurysm_clip",
    "postsurgical_changes", "resection_cavity", "tumor_resection_cavity", "catheter", "brain_lead",
    "intracranial_pressure_monitor", "cephaloceles", "chordoma_chondrosarcoma",
}
_SINUS = frozenset({
    "sinusitis", "mastoid_effusion", "otitis_media", "cholesteatoma", "skull_base_fracture",
    "craniofacial_injury", "orbital_trauma", "head_neck_tumor", "orbital_emphysema",
})
_ORBIT = frozenset({"orbital_tumor", "orbital_trauma", "orbital_emphysema", "craniofacial_injury",
                    "neuromyelitis_optica", "carotid_cavernous_fistula"})
_MASS = frozenset(
    {lab for lab, sp in _SPECS.items() if sp.family in ("mass", "variant")}
    | {"brain_mass_effect", "midline_shift", "brain_midline_shift", "brain_herniation",
       "cerebral_subdural_empyema", "neurosarcoidosis", "dandy_walker_malformation",
       "intraparenchymal_hemorrhage", "intracranial_hemorrhage"}
)
_VESSELS = frozenset({
    "venous_sinus_thrombosis", "cerebral_venous_sinus_thrombosis", "moya_moya_disease", "arterial_dissection",
    "large_vessel_occlusion", "cerebral_aneurysm", "intracranial_aneurysm", "arteriovenous_malformation",
    "cerebral_arteriovenous_malformation", "carotid_cavernous_fistula", "aneurysm_clip", "aneurysm_coil",
    "embolization_material", "intracranial_atherosclerosis",
})
_CISTERNS = frozenset({"brain_herniation", "cerebral_edema", "aneurysmal_subarachnoid_hemorrhage",
                       "traumatic_subarachnoid_hemorrhage", "brain_mass_effect", "midline_shift",
                       "brain_midline_shift", "obstructive_hydrocephalus", "intracranial_hypotension",
                       "neurosarcoidosis", "mega_cisterna_magna", "arachnoid_cyst"})
_ALL = frozenset(_SPECS)


@dataclass(frozen=True)
class _Neg:
    key: str
    modalities: tuple[str, ...]
    suppress: frozenset  # present labels that forbid this negation
    templates: tuple[tuple[str, frozenset], ...]  # (sentence, extra suppressors)
    short: str = ""  # noun for a combined "No a, b, or c." sentence
    importance: float = 0.5  # chance to appear in an abnormal report (1 = always)
    normal_only: bool = False


_E = frozenset()

_NEGATIONS: tuple[_Neg, ...] = (
    _Neg("ich", ("CT", "MR"), _ICH, (
        ("No intracranial hemorrhage.", _E),
        ("There is no acute intracranial hemorrhage.", _E),
        ("No evidence of acute intracranial hemorrhage.", _E),
        ("No acute intracranial hemorrhage is identified.", _E)),
        short="intracranial hemorrhage", importance=1.0),
    _Neg("mass_effect", ("CT", "MR"), _MASS_EFFECT, (
        ("No mass effect.", _E), ("There is no mass effect.", _E)),
        short="mass effect", importance=0.7),
    _Neg("shift", ("CT", "MR"), _SHIFT, (
        ("No midline shift.", _E), ("There is no midline shift.", _E),
        ("The midline structures are centered.", _E)),
        short="midline shift", importance=1.0),
    _Neg("extra_axial", ("CT", "MR"), _COLLECTION, (
        ("No extra-axial fluid collection.", _E), ("There is no extra-axial collection.", _E),
        ("No extra-axial collection is seen.", _E)),
        short="extra-axial collection", importance=0.6),
    _Neg("infarct", ("CT",), _INFARCT, (
        ("No CT evidence of acute large territorial infarct.", _E),
        ("Gray-white matter differentiation is preserved.", _GW_BLUR),
        ("No acute territorial infarct is identified.", _E)),
        short="acute territorial infarct", importance=0.6),
    _Neg("infarct_mr", ("MR",), _INFARCT, (
        ("No acute infarct.", _E), ("There is no evidence of acute infarction.", _E),
        ("No findings to suggest acute ischemia.", _E)),
        short="acute infarct", importance=0.8),
    _Neg("ventricles", ("CT", "MR"), _VENTRICLES, (
        ("The ventricles are normal in size.", _E),
        ("Ventricular size is within normal limits.", _E),
        ("The ventricles are normal in size and configuration.", _E),
        ("No hydrocephalus.", _E)),
        short="hydrocephalus", importance=1.0),
    _Neg("cisterns", ("CT", "MR"), _CISTERNS, (
        ("The basal cisterns are patent.", _E), ("The basal cisterns are preserved.", _E)),
        importance=0.3),
    _Neg("fracture", ("CT",), _FRACTURE, (
        ("No acute calvarial fracture.", _E), ("The calvarium is intact.", _CALVARIUM_ALTERED),
        ("No displaced skull fracture.", _E)),
        importance=0.7),
    _Neg("mass", ("CT", "MR"), _MASS, (
        ("No intracranial mass lesion.", _E), ("No focal intracranial mass is seen.", _E)),
        importance=0.3),
    _Neg("flow_voids", ("MR",), _VESSELS, (
        ("The major intracranial flow voids are preserved.", _E),
        ("Normal flow voids are present in the major intracranial vessels.", _E)),
        importance=0.5),
    _Neg("dense_vessel", ("CT",), _INFARCT | _VESSELS, (
        ("No hyperdense vessel sign.", _E),), importance=0.2),
    _Neg("sinuses", ("CT", "MR"), _SINUS, (
        ("The visualized paranasal sinuses and mastoid air cells are clear.", _E),
        ("The paranasal sinuses and mastoid air cells are well aerated.", _E),
        ("The included paranasal sinuses and mastoids are clear.", _E)),
        importance=0.5),
    _Neg("orbits", ("CT", "MR"), _ORBIT, (
        ("The orbits are unremarkable.", _E), ("The visualized orbits are unremarkable.", _E)),
        importance=0.3),
    # only in a report without findings
    _Neg("parenchyma_ct", ("CT",), _ALL, (
        ("The brain parenchyma is normal in attenuation.", _E),
        ("No focal parenchymal abnormality.", _E)), normal_only=True),
    _Neg("parenchyma_mr", ("MR",), _ALL, (
        ("No abnormal signal intensity in the brain parenchyma.", _E),
        ("The brain parenchyma is normal in signal intensity.", _E),
        ("No restricted diffusion.", _E)), normal_only=True),
    _Neg("sulci", ("CT", "MR"), _ALL, (
        ("The sulci are normal for age.", _E), ("The cerebral sulci are age appropriate.", _E)),
        normal_only=True),
)
_NEG_CONTRAST = _Neg("enhancement", ("MR",), _ALL, (("No abnormal enhancement.", _E),), normal_only=True)


def _negations(modality: str, present: frozenset, normal: bool, contrast: bool,
               rng: np.random.Generator) -> list[str]:
    items = list(_NEGATIONS) + ([_NEG_CONTRAST] if contrast else [])
    chosen: list[tuple[_Neg, str | None]] = []  # (item, sentence) ; sentence None -> combinable
    for neg in items:
        if modality not in neg.modalities:
            continue
        if present & neg.suppress:
            continue
        if neg.normal_only and not normal:
            continue
        keep = neg.importance if not normal else max(neg.importance, 0.6)
        if keep < 1.0 and not _chance(rng, keep):
            continue
        allowed = [t for t, extra in neg.templates if not (present & extra)]
        if not allowed:
            continue
        chosen.append((neg, _pick(rng, allowed)))
    # sometimes fold the short-noun negations into one list sentence
    combinable = [n for n, _ in chosen if n.short]
    out: list[str] = []
    if len(combinable) >= 2 and _chance(rng, 0.5):
        k = int(rng.integers(2, min(4, len(combinable)) + 1))
        group = combinable[:k]
        nouns = [n.short for n in group]
        listed = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + ("," if len(nouns) > 2 else "") + " or " + nouns[-1]
        lead = _pick(rng, ("No {}.", "There is no {}.", "No evidence of {}."))
        out.append(lead.format(listed))
        skip = {n.key for n in group}
        out.extend(s for n, s in chosen if n.key not in skip)
    else:
        out.extend(s for _, s in chosen)
    return out


# --------------------------------------------------------------------------------------------
# rendering of one finding


def _present_closure(modality: str, labels: Iterable[str]) -> frozenset:
    """Labels present plus everything they imply (in either modality's table)."""
    out: set[str] = set()
    names = {m: set(tables.label_names(m)) for m in tables.MODALITIES}
    order = [modality] + [m for m in tables.MODALITIES if m != modality]
    for lab in labels:
        out.add(lab)
        for m in order:
            if lab in names[m]:
                out.update(tables.parents(m, lab))
                break
    return frozenset(out)


def _ancestors(modality: str, label: str) -> list[str]:
    for m in [modality] + [x for x in tables.MODALITIES if x != modality]:
        if label in tables.label_names(m):
            return tables.parents(m, label)
    return []


def _finding_acuity(modality: str, f: Finding) -> str:
    if f.acuity:
        return f.acuity
    for m in [modality] + [x for x in tables.MODALITIES if x != modality]:
        if f.label in tables.label_names(m):
            return tables.acuity(m, f.label)
    return "Routine"


def _choose_unit(rng: np.random.Generator, size_mm: float, p_cm: float) -> str:
    if size_mm < 10:
        p_cm *= 0.3
    return "cm" if _chance(rng, p_cm) else "mm"


def _context(modality: str, f: Finding, spec: _Spec, present: frozenset, contrast: bool,
             p_cm: float, rng: np.random.Generator) -> dict:
    noun = _pick(rng, spec.nouns)
    stage = str(f.extra.get("stage", "")).strip().lower()
    adj = ""
    if spec.adj == _ACUTE:
        if stage in ("acute", "subacute", "chronic"):
            adj = stage + " "
        elif _chance(rng, 0.7):
            adj = "acute "
    elif spec.adj and _chance(rng, 0.6):
        adj = _pick(rng, spec.adj)
    if "degree" in f.extra and spec.family in ("ventricles", "mass_effect", "ent", "sah", "air"):
        adj = f"{f.extra['degree']} "
    noun_adj = f"{adj}{noun}"

    size = ""
    if spec.sized and f.size_mm > 0:
        size = format_size(f.size_mm, _choose_unit(rng, f.size_mm, p_cm))
    sized_np = f"{size} {noun_adj}" if size else noun_adj
    if spec.countable:
        np_s = f"{_article(sized_np)} {sized_np}"
        a_noun = f"{_article(noun_adj)} {noun_adj}"
    else:
        np_s = noun_adj if not size else f"{noun_adj} measuring {size}"
        a_noun = noun_adj

    loc = f.location or spec.loc
    place = _place(loc, f.side)
    in_loc = f"in the {place}" if place else _SIDE_ONLY[f.side]
    the_loc = f"the {place}" if place else f"the {f.side} side"
    side_adj = f.side

    meas = meas_c = meas_t = meas_span = ""
    if size:
        meas = _pick(rng, (f" measuring {size}", f" measuring up to {size}", f" measuring approximately {size}"))
        meas_c = "," + meas
        meas_t = _pick(rng, (f" measuring {size} in thickness", f", with a maximal thickness of {size}",
                             f", up to {size} thick"))
        meas_span = _pick(rng, (f", spanning approximately {size}", f", extending over {size}"))

    tail = ""
    if spec.family in _EDEMA_FAMILIES and "cerebral_edema" in present and f.label != "cerebral_edema":
        tail = _pick(rng, (" with surrounding edema", " with surrounding vasogenic edema", ", with perilesional edema"))
    elif spec.family == "variant" and not (present & _MASS_EFFECT) and f.label == "arachnoid_cyst":
        tail = _pick(rng, ("", ", without mass effect on the adjacent brain"))

    degree = str(f.extra.get("degree") or _pick(rng, ("mild", "moderate", "mild", "moderate", "severe")))
    if spec.family == "svd" and "degree" not in f.extra:
        degree = _pick(rng, ("mild", "moderate", "mild", "extensive"))
    count = f.extra.get("count")
    count_word = "Multiple" if not count else ("Several" if int(count) < 6 else "Numerous")

    level = ""
    if spec.family == "ventricles" and f.extra.get("level"):
        level = f", with obstruction at the level of the {f.extra['level']}"

    disp = ""
    if spec.family == "fracture" and size:
        disp = _pick(rng, (f" with {size} of displacement", f", depressed by {size}",
                           f" with up to {size} of inward displacement"))

    tonsil = ""
    if spec.family == "chiari" and size:
        tonsil = _pick(rng, (f", with tonsillar descent of {size}", f" with {size} of tonsillar descent"))

    htype = str(f.extra.get("type") or "subfalcine").replace("_", " ")
    hdetail = _pick(rng, _HERNIATION_DETAIL.get(htype, ("",))) if _chance(rng, 0.6) else ""

    shift_sentence = shift_imp = ""
    if spec.family == "shift":
        shift_sentence, shift_imp = _shift_text(f, p_cm, rng)

    isize = ""
    if size and _chance(rng, 0.6):
        isize = _pick(rng, (f", {size}", f" ({size})", f", measuring {size}"))
    pre_place = place if place else side_adj
    ctx = dict(
        noun=noun, noun_adj=noun_adj, adjp=adj, np_s=np_s, a_noun=a_noun, np_ns=noun_adj, size=size,
        meas=meas, meas_c=meas_c, meas_t=meas_t or "", meas_span=meas_span, place=place or f.side,
        in_loc=in_loc, the_loc=the_loc, side=f.side, side_adj=side_adj, tail=tail, degree=degree,
        count_word=count_word, level=level, disp=disp, tonsil=tonsil, htype=htype, hdetail=hdetail,
        shift_sentence=shift_sentence, shift_imp=shift_imp, isize=isize, pre_place=pre_place,
        place_or_side=place if place else side_adj,
        side_tag="" if f.side in ("bilateral", "midline") else f", {f.side}",
        focal=(f", most pronounced in {the_loc}" if f.side in ("left", "right") else f" involving {the_loc}"),
    )
    return ctx


def _shift_text(f: Finding, p_cm: float, rng: np.random.Generator) -> tuple[str, str]:
    mm = f.extra.get("shift_mm", f.size_mm)
    mm = float(mm) if mm else 0.0
    shift = format_size(mm, _choose_unit(rng, mm, p_cm * 0.4)) if mm > 0 else ""
    if f.side in ("left", "right"):
        d = f"{f.side}ward"
        if shift:
            s = _pick(rng, (
                f"There is {shift} of {d} midline shift.",
                f"{d} midline shift measures {shift}.",
                f"Mass effect results in {shift} of {d} midline shift at the level of the septum pellucidum.",
                f"Midline shift of {shift} to the {f.side}.",
            ))
            imp = _pick(rng, (f"{shift} {d} midline shift.", f"{d} midline shift of {shift}.",
                              f"Midline shift of {shift} to the {f.side}."))
        else:
            s = _pick(rng, (f"There is {d} midline shift.", f"Mass effect with {d} midline shift."))
            imp = f"{d} midline shift."
    else:
        qual = " with bilateral mass effect" if f.side == "bilateral" else ""
        if shift:
            s = _pick(rng, (f"There is {shift} of midline shift{qual}.",
                            f"Shift of the midline structures measures {shift}{qual}."))
            imp = f"Midline shift of {shift}{qual}."
        else:
            s = f"There is shift of the midline structures{qual}."
            imp = f"Shift of the midline structures{qual}."
    return s, imp


def _templates(spec: _Spec, modality: str) -> list[str]:
    pool = spec.tpl or _FAMILY_TPL.get(spec.family, _GENERIC)
    out = [t for m, t in pool if m in ("any", modality)]
    return out or [t for m, t in _GENERIC]


def _render(modality: str, f: Finding, present: frozenset, contrast: bool, p_cm: float,
            rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentences, impression line) for one finding."""
    spec = _SPECS[f.label]
    ctx = _context(modality, f, spec, present, contrast, p_cm, rng)
    sent = _tidy(_pick(rng, _templates(spec, modality)).format_map(ctx))
    details = {"CT": spec.ct, "MR": spec.mr + (spec.mrc if contrast else ())}[modality]
    if details and _chance(rng, 0.5):
        sent += " " + _tidy(_pick(rng, details).format_map(ctx))
    imp_pool = spec.imp or _FAMILY_IMP.get(spec.family, _GENERIC_IMP)
    overlap = set(re.findall(r"[a-z]+", ctx["pre_place"].lower())) & set(re.findall(r"[a-z]+", ctx["noun"].lower()))
    if overlap:  # "left parietal scalp scalp hematoma"
        imp_pool = tuple(t for t in imp_pool if "{pre_place}" not in t) or imp_pool
    imp = _tidy(_pick(rng, imp_pool).format_map(ctx))
    if f.side in ("left", "right") and not re.search(rf"\b{f.side}", imp, re.IGNORECASE):
        imp = imp[:-1] + f", {f.side}." if imp.endswith(".") else imp + f", {f.side}"
    return sent, imp


# --------------------------------------------------------------------------------------------
# public: report


_NORMAL_IMP = {
    "CT": ("No acute intracranial abnormality.", "Normal noncontrast CT of the head.",
           "Unremarkable CT of the head.", "No acute intracranial process."),
    "MR": ("No acute intracranial abnormality.", "Normal MRI of the brain.", "Unremarkable MRI of the brain.",
           "No acute intracranial process."),
}
_NO_ACUTE = ("No acute intracranial abnormality.", "No acute intracranial process.")
_COMMUNICATED = ("Critical findings were communicated to the ordering clinician.",
                 "These results were discussed with the ordering team at the time of interpretation.",
                 "Findings were communicated to the referring provider.")
_CONTRAST_FAMILIES = {"mass", "ms"}
_CONTRAST_CATS = {"tumor", "glioma", "meningioma", "metastasis", "infection", "encephalitis", "demyelination",
                  "postop_tumor", "pituitary", "schwannoma", "posterior", "avm", "cvst"}


def _exam(modality: str, findings: Sequence[Finding], rng: np.random.Generator) -> str:
    if modality == "CT":
        return "CT head without contrast"
    wants = any(_SPECS[f.label].cat in _CONTRAST_CATS for f in findings)
    if wants or _chance(rng, 0.4):
        return "MRI brain with and without contrast"
    return "MRI brain without contrast"


def _has_contrast(exam: str) -> bool:
    e = exam.lower()
    return "with" in e.replace("without", "") and "contrast" in e


def write_report(modality: str, findings: Sequence[Finding], rng: np.random.Generator,
                 exam: str | None = None) -> dict:
    """A radiology report for a study with ``findings`` (empty: a normal study).

    Returns ``{"exam_type", "findings", "impression"}``; the impression is a numbered list,
    one line per item, most urgent first.
    """
    mod = tables.normalize_modality(modality)
    findings = list(findings)
    for f in findings:
        if not isinstance(f, Finding):
            raise TypeError(f"findings must be Finding objects, got {type(f).__name__}")
    exam_type = exam if exam else _exam(mod, findings, rng)
    contrast = _has_contrast(exam_type)
    present = _present_closure(mod, [f.label for f in findings])

    # drop findings implied by a more specific finding of the same study
    implied: set[str] = set()
    for f in findings:
        implied.update(_ancestors(mod, f.label))
    shown = [f for f in findings if f.label not in implied]

    rank = {lvl: i for i, lvl in enumerate(tables.ACUITY_LEVELS)}
    order = sorted(range(len(shown)), key=lambda i: (rank[_finding_acuity(mod, shown[i])], i))
    shown = [shown[i] for i in order]
    p_cm = float(rng.uniform(0.2, 0.8))

    sentences: list[str] = []
    imp_lines: list[str] = []
    for f in shown:
        sent, imp = _render(mod, f, present, contrast, p_cm, rng)
        sentences.append(sent)
        imp_lines.append(imp)

    normal = not shown
    negs = _negations(mod, present, normal, contrast, rng)
    if normal:
        body = negs[:]
        if _chance(rng, 0.3):
            body.insert(0, "No acute intracranial abnormality.")
        impression = [_pick(rng, _NORMAL_IMP[mod])]
    else:
        body = sentences + negs
        levels = [_finding_acuity(mod, f) for f in shown]
        impression = list(imp_lines)
        quiet = all(_SPECS[f.label].family in _QUIET_FAMILIES for f in shown)
        if "Urgent" not in levels and quiet and _chance(rng, 0.6):
            impression.insert(0, _pick(rng, _NO_ACUTE))
    text_imp = "\n".join(f"{i}. {line}" for i, line in enumerate(impression, start=1))
    if not normal and any(_finding_acuity(mod, f) == "Urgent" for f in shown) and _chance(rng, 0.3):
        text_imp += "\n" + _pick(rng, _COMMUNICATED)
    return {"exam_type": exam_type, "findings": " ".join(body), "impression": text_imp}


# --------------------------------------------------------------------------------------------
# public: indication

_INDICATIONS: dict[str, tuple[str, ...]] = {
    "trauma": ("Fall on anticoagulation, headache.", "Fall from standing, struck head.",
               "Motor vehicle collision with loss of consciousness.", "Head trauma.", "Assault, head injury.",
               "Found down, unknown mechanism.", "Fall on blood thinners.", "Ground-level fall, confusion."),
    "face": ("Assault with facial swelling.", "Facial trauma.", "Fall with facial injury.",
             "Motor vehicle collision, facial pain."),
    "bleed": ("Sudden {contra}-sided weakness and headache.", "Hypertensive emergency, altered mental status.",
              "Sudden severe headache and vomiting.", "Decreased level of consciousness.",
              "Acute onset confusion."),
    "sah": ("Worst headache of life.", "Thunderclap headache.", "Sudden severe headache with neck stiffness.",
            "Sudden headache and collapse."),
    "stroke": ("Sudden {contra}-sided weakness.", "Code stroke.", "Acute {contra} hemiparesis.",
               "{contra_cap} facial droop and arm weakness.", "Stroke alert, slurred speech."),
    "stroke_left": ("Acute onset aphasia.", "Sudden right-sided weakness and word-finding difficulty."),
    "stroke_mid": ("Acute onset dizziness and ataxia.", "Code stroke.", "Sudden vertigo and dysarthria.",
                   "Altered mental status."),
    "dissection": ("Neck pain and {contra}-sided weakness.", "Neck pain after minor trauma, headache.",
                   "Transient {contra}-sided numbness."),
    "cvst": ("Severe headache, postpartum.", "Headache and blurred vision.", "Persistent headache on oral contraceptives.",
             "Headache and papilledema."),
    "vascular": ("Transient ischemic attack.", "Headache.", "Transient episodes of weakness.", "Visual disturbance."),
    "tumor": ("New-onset seizure.", "Progressive headaches.", "Progressive {contra}-sided weakness.",
              "Personality change and headache.", "Headache and nausea."),
    "glioma": ("Follow-up of known glioma.", "New-onset seizure.", "Tumor surveillance.", "Progressive headaches."),
    "meningioma": ("Follow-up of known meningioma.", "Headache.", "New-onset seizure.", "Dizziness."),
    "metastasis": ("Known malignancy, staging.", "History of lung cancer, new headaches.",
                   "History of breast cancer, confusion.", "Metastatic workup."),
    "pituitary": ("Visual field deficit.", "Elevated prolactin.", "Headache and visual changes.",
                  "Abnormal pituitary hormone levels."),
    "schwannoma": ("Asymmetric sensorineural hearing loss.", "{side_cap}-sided hearing loss and tinnitus.",
                   "Vertigo and tinnitus."),
    "posterior": ("Headache and vomiting.", "Morning headaches and vomiting.", "Ataxia.", "Gait instability."),
    "bone": ("Palpable scalp lump.", "Scalp lesion.", "Headache."),
    "orbit": ("Proptosis.", "Vision changes.", "Painless proptosis of the {side} eye."),
    "neck": ("Neck mass.", "Dysphagia.", "Neck swelling."),
    "spine": ("Neck pain.", "Neck pain and paresthesias.", "Headache and neck pain."),
    "throat": ("Sore throat, fever, and difficulty swallowing.", "Neck swelling and fever.",
               "Odynophagia and fever."),
    "infection": ("Fever and headache.", "Fever, altered mental status.", "Seizure and fever.",
                  "Immunocompromised, fever and headache."),
    "encephalitis": ("Fever, confusion, and seizure.", "Altered mental status and fever.", "New seizure with fever."),
    "hydrocephalus": ("Headache, nausea, and vomiting.", "Worsening headache and lethargy.",
                      "Decreased level of consciousness."),
    "ventricles": ("Gait instability and urinary incontinence.", "Memory loss.", "Headache.",
                   "Cognitive decline."),
    "shunt": ("Known shunt, evaluate for malfunction.", "Headache in a patient with a shunt.",
              "Shunt check."),
    "icu": ("Intubated patient, follow-up imaging.", "Neuro ICU follow-up.", "Decreased level of consciousness."),
    "dbs": ("History of Parkinson disease, postoperative evaluation.", "Postoperative evaluation.",
            "Movement disorder, post-procedure imaging."),
    "postop": ("Postoperative evaluation.", "Post-procedure follow-up.", "Follow-up after neurosurgical procedure."),
    "postop_tumor": ("Postoperative evaluation.", "Tumor surveillance.", "Follow-up after tumor resection.",
                     "Post-treatment follow-up."),
    "aneurysm": ("Headache.", "Family history of aneurysm, screening.", "Headache and visual changes."),
    "aneurysm_treated": ("Follow-up of treated aneurysm.", "Post-procedure follow-up.", "Headache."),
    "avm": ("New-onset seizure.", "Headache.", "Seizure disorder."),
    "demyelination": ("Numbness and tingling.", "Blurred vision in the {side} eye.", "Paresthesias.",
                      "Follow-up of demyelinating disease.", "Vertigo and numbness."),
    "chronic": ("Memory loss.", "Cognitive decline.", "Dizziness.", "Syncope.", "Fall.", "Confusion.",
                "Gait instability."),
    "congenital": ("Seizure.", "Headache.", "Headache with coughing."),
    "congenital_child": ("Developmental delay.", "Seizures.", "Macrocephaly.", "Abnormal head shape."),
    "edema": ("Altered mental status.", "Decreased level of consciousness.", "Headache and vomiting."),
    "air": ("Postoperative evaluation.", "Headache after procedure.", "Altered mental status."),
    "hypotension": ("Orthostatic headache.", "Headache worse when upright.", "Positional headache."),
    "ent": ("Headache.", "Facial pain and congestion.", "Dizziness.", "Sinus pressure."),
    "ear": ("Ear pain and fever.", "Hearing loss.", "Otorrhea.", "Ear pain."),
    "incidental": ("Headache.", "Dizziness.", "Syncope.", "Altered mental status."),
    "variant": ("Headache.", "Dizziness.", "Syncope.", "Seizure.", "Migraine."),
    "nonspecific": ("Headache.", "Dizziness.", "Altered mental status.", "Syncope.", "Confusion.", "Weakness.",
                    "Vertigo.", "Seizure."),
}
_NORMAL_INDICATION = {
    "CT": ("Headache.", "Dizziness.", "Syncope.", "Altered mental status.", "Fall, rule out intracranial hemorrhage.",
           "Fall from standing.", "Seizure.", "Confusion.", "Head trauma.", "Weakness."),
    "MR": ("Headache.", "Dizziness.", "Numbness.", "Memory loss.", "Seizure.", "Vertigo.", "Migraine.",
           "Visual disturbance.", "Evaluate for intracranial pathology."),
}
# lines that read badly after "78-year-old man with ..."; they follow a comma instead
_NOT_A_SYMPTOM = ("Code stroke", "Stroke alert", "Follow-up", "Tumor surveillance", "Postoperative", "Post-",
                  "History of", "Known", "Metastatic workup", "Shunt check", "Neuro ICU", "Intubated", "Evaluate",
                  "Family history", "Fall, rule out")
_TRAUMA_CATS = {"trauma", "face"}
_POSTOP_CATS = {"postop", "postop_tumor", "shunt", "dbs", "icu", "aneurysm_treated"}


def _person(age: int, sex: str) -> str:
    s = str(sex).strip().lower()
    male = s in ("m", "male", "man", "boy")
    female = s in ("f", "female", "woman", "girl")
    if age < 1:
        return "infant"
    if age < 18:
        return "boy" if male else "girl" if female else "child"
    return "man" if male else "woman" if female else "patient"


def _decap(text: str) -> str:
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[1:].islower() and first not in ("Parkinson",):
        return text[0].lower() + text[1:]
    return text


def indication(modality: str, findings: Sequence[Finding], age: int, sex: str,
               rng: np.random.Generator) -> str:
    """A one-line clinical indication plausible for ``findings`` without naming them.

    The most urgent finding (trauma first when any finding is traumatic) picks the clinical
    scenario; one time in five the line is nonspecific anyway. Sometimes age and sex lead
    ("78-year-old man with ..."); nothing else about the patient is written.
    """
    mod = tables.normalize_modality(modality)
    findings = list(findings)
    age = int(age)
    rank = {lvl: i for i, lvl in enumerate(tables.ACUITY_LEVELS)}

    if not findings:
        line = _pick(rng, _NORMAL_INDICATION[mod])
    else:
        ordered = sorted(range(len(findings)), key=lambda i: (rank[_finding_acuity(mod, findings[i])], i))
        top = findings[ordered[0]]
        cats = [_SPECS[findings[i].label].cat for i in ordered]
        if any(c in _TRAUMA_CATS for c in cats):
            cat = next(c for c in cats if c in _TRAUMA_CATS)
            top = next(findings[i] for i in ordered if _SPECS[findings[i].label].cat == cat)
        elif cats[0] in ("air", "edema") and any(c in _POSTOP_CATS for c in cats):
            cat = next(c for c in cats if c in _POSTOP_CATS)
        else:
            cat = cats[0]
        if cat == "stroke" and top.side == "left" and _chance(rng, 0.3):
            cat = "stroke_left"
        elif cat == "stroke" and top.side in ("midline", "bilateral"):
            cat = "stroke_mid"
        elif cat == "congenital" and age < 18:
            cat = "congenital_child"
        if cat in ("glioma", "meningioma") and any(_SPECS[f.label].cat in _POSTOP_CATS for f in findings):
            cat = "postop_tumor"
        if _chance(rng, 0.2):
            cat = "nonspecific"
        pool = _INDICATIONS.get(cat, _INDICATIONS["nonspecific"])
        if top.side not in ("left", "right"):
            pool = tuple(p for p in pool if "{" not in p) or _INDICATIONS["nonspecific"]
        line = _pick(rng, pool)
        contra = {"left": "right", "right": "left"}.get(top.side, "")
        line = line.format(contra=contra, contra_cap=contra.capitalize(), side=top.side,
                           side_cap=top.side.capitalize())

    if _chance(rng, 0.3):
        who = _person(age, sex)
        if _chance(rng, 0.8) or who == "infant":
            lead = f"{age}-year-old {who}" if who != "infant" else "Infant"
            joiner = ", " if line.startswith(_NOT_A_SYMPTOM) else " with "
            line = f"{lead}{joiner}{_decap(line)}"
        else:
            tag = {"man": "M", "boy": "M", "woman": "F", "girl": "F"}.get(who)
            line = f"{age}{tag}, {_decap(line)}" if tag else f"{age}-year-old {who} with {_decap(line)}"
    return line
