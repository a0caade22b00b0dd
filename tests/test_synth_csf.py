"""CSF spaces: age-related normal variation without a label, and atrophy / ventriculomegaly
labelled by anatomical criteria (sulcal widening advanced for age; ventricles out of proportion
to the sulci), so that total CSF volume alone does not give the labels away."""

from __future__ import annotations

import numpy as np
import pytest

from neurovfm.synth import anatomy
from neurovfm.synth.anatomy import csf_labels, disease_csf, make_subject, normal_csf
from neurovfm.synth.assets import load_template
from neurovfm.synth.pathology import FAMILIES, Painter


@pytest.fixture(scope="module")
def template():
    return load_template()


def _measure(subject) -> dict[str, float]:
    """CSF volumes (ml) measured on the subject's tissue maps: in and around the ventricles,
    over the convexity (sulci) and in total."""
    t = subject.template
    csf = subject.tissues["csf"]
    vent = float(csf[(t.vent_dist < 14) & (t.icv_depth > 6)].sum()) / 1000
    sulcal = float(csf[(t.icv_depth > 0) & (t.icv_depth < 12) & (t.vent_dist >= 14)].sum()) / 1000
    return {"vent": vent, "sulcal": sulcal, "total": float(csf[t.icv_depth > 0].sum()) / 1000}


def test_normal_heads_vary_with_age_but_never_meet_the_criteria():
    rng = np.random.default_rng(0)
    ages = rng.integers(18, 96, 400)
    sv = np.array([normal_csf(int(a), rng) for a in ages])
    assert np.corrcoef(ages, sv[:, 0])[0, 1] > 0.5  # sulci widen with age
    assert np.corrcoef(ages, sv[:, 1])[0, 1] > 0.4  # ventricles grow with age
    assert sv[:, 0].std() > 0.1 and sv[:, 1].std() > 1.0  # a real spread, not a constant
    for a, (s, v) in zip(ages, sv):
        assert not any(csf_labels(s, v, a).values())
    # old normal heads have clearly enlarged CSF spaces without any label
    old = sv[ages > 75]
    assert (old[:, 1] > 3.0).mean() > 0.3 and (old[:, 0] > 0.35).mean() > 0.3


@pytest.mark.parametrize("atrophy,vm,obstructive", [(True, False, False), (False, True, False), (True, True, False),
                                                    (False, False, True), (False, False, False)])
def test_planned_heads_meet_exactly_their_criteria(atrophy, vm, obstructive):
    rng = np.random.default_rng(1)
    for age in range(20, 96, 3):
        s, v = disease_csf(age, rng, atrophy, vm, obstructive)
        lab = csf_labels(s, v, age)
        assert lab["cerebral_atrophy"] == atrophy
        assert lab["ventriculomegaly"] == (vm or obstructive)


def test_labels_follow_shape_not_csf_volume(template):
    """An old normal head has more CSF than a young head with ventriculomegaly or a middle-aged
    head with atrophy; what separates them is where the CSF is, and the age."""
    e88, e45 = anatomy.expected_sulcal(88), anatomy.expected_sulcal(45)
    k = anatomy.VENT_PER_SULCAL
    old_normal = make_subject(template, np.random.default_rng(3), age=88, atrophy=e88 + anatomy.NORMAL_SULCAL_MARGIN,
                              ventricle_mm=k * (e88 + anatomy.NORMAL_SULCAL_MARGIN) + 1.8)
    young_vm = make_subject(template, np.random.default_rng(4), age=30, atrophy=0.05,
                            ventricle_mm=k * 0.05 + anatomy.VM_EXCESS_MM + 0.3)
    atrophic = make_subject(template, np.random.default_rng(5), age=45, atrophy=e45 + anatomy.ATROPHY_MARGIN + 0.02,
                            ventricle_mm=k * (e45 + 0.24) - 0.5)
    normal45 = make_subject(template, np.random.default_rng(5), age=45, atrophy=e45, ventricle_mm=k * e45)
    normal30 = make_subject(template, np.random.default_rng(4), age=30, atrophy=0.05, ventricle_mm=k * 0.05 + 0.5)
    m_old, m_vm, m_atr, m_45 = _measure(old_normal), _measure(young_vm), _measure(atrophic), _measure(normal45)
    m_30 = _measure(normal30)
    assert m_old["total"] > m_vm["total"] and m_old["total"] > m_atr["total"]
    # ventriculomegaly: much larger ventricles than a normal head with the same sulci
    assert abs(m_vm["sulcal"] - m_30["sulcal"]) < 0.05 * m_30["sulcal"] and m_vm["vent"] > 1.3 * m_30["vent"]
    assert m_atr["sulcal"] > m_45["sulcal"] * 1.1  # wider sulci than a normal head of the same age

    labels = {}
    for name, subj in (("old", old_normal), ("vm", young_vm), ("atrophy", atrophic), ("45", normal45)):
        p = Painter(subj, np.random.default_rng(9))
        FAMILIES["atrophy"](p)
        FAMILIES["ventriculomegaly"](p)
        labels[name] = {lab for les in p.lesions for lab in les.ct_labels}
    assert labels == {"old": set(), "vm": {"ventriculomegaly"}, "atrophy": {"cerebral_atrophy"}, "45": set()}


def test_deep_grey_iron_is_an_unlabelled_mimic(template):
    s = make_subject(template, np.random.default_rng(6), age=80)
    p = Painter(s, np.random.default_rng(7))
    p.mimics()
    assert "iron" in s.tissues and s.tissues["iron"][template.region("Pallidum")].mean() > 0.1
    assert not p.lesions
