"""Per-subject anatomical label maps: where each named structure of *this* head lies in the scanner.

Every synthetic subject is the template warped (similarity transform + smooth non-linear warp +
asymmetry) and aged (atrophy, ventricle size). The same mapping that renders its series carries
the template's labels into the scanner, so each study gets a label map in scanner RAS that lines
up with all of its series: AAL3 regions (permissive licence) where AAL3 labels grey matter, and
the subject's own dominant tissue elsewhere (white matter by hemisphere, ventricles, other CSF,
bone, soft tissue; 0 = air / outside). The map is of the normal anatomy of the head before
pathology; lesions and mass effect are in the lesion masks.

Used by the anatomy probe (:mod:`neurovfm.eval.anatomy`): does a frozen token feature know which
structure the token covers? The coarse classes (lobe-level group x side, and the tissue classes)
are what it predicts; the fine AAL3 codes stay in the map for finer probes.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from neurovfm.synth.anatomy import Subject
from neurovfm.synth.assets import GRID_AFFINE, Template

SPACING_MM = 2.0
FOV_MM = (210.0, 250.0, 230.0)  # R-L, A-P, S-I extent of the map around the head
HEAD_CENTRE_TEMPLATE = np.array([0.0, -18.0, 18.0])  # template RAS mm near the middle of the head

# codes above the AAL3 range (1..170) for what AAL3 does not label
TISSUE_CODES = {"white_matter_L": 201, "white_matter_R": 202, "ventricle": 203, "csf": 204, "bone": 205,
                "soft_tissue": 206}

# AAL3 name prefix -> lobe-level group (first match wins; order matters for shared prefixes)
REGION_GROUPS = (
    (("Precentral", "Frontal", "Rolandic", "Supp_Motor", "Olfactory", "Rectus", "OFC", "Paracentral"), "frontal"),
    (("Insula", "Cingulate", "ACC", "Hippocampus", "ParaHippocampal", "Amygdala"), "limbic"),
    (("Calcarine", "Cuneus", "Lingual", "Occipital"), "occipital"),
    (("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"), "parietal"),
    (("Heschl", "Temporal", "Fusiform"), "temporal"),
    (("Caudate", "Putamen", "Pallidum", "Thal", "N_Acc"), "deep_grey"),
    (("Cerebellum", "Vermis"), "cerebellum"),
    (("VTA", "SN_", "Red_N", "LC_", "Raphe"), "brainstem"),
)


def region_class(name: str) -> str:
    """Coarse class of an AAL3 region name: lobe-level group and side (``_L``, ``_R``, ``_M``)."""
    group = next((g for prefixes, g in REGION_GROUPS if name.startswith(prefixes)), "other_grey")
    side = "L" if name.endswith("_L") else ("R" if name.endswith("_R") else "M")
    return f"{group}_{side}"


def legend(template: Template) -> dict[int, tuple[str, str]]:
    """code -> (name, coarse class) for every code a map can hold (0 = outside, not listed)."""
    out = {int(i): (n, region_class(n)) for i, n in template.aal_names.items()}
    out.update({c: (n, n) for n, c in TISSUE_CODES.items()})
    return out


def subject_labels(subject: Subject) -> np.ndarray:
    """The label map on the template grid for this subject's (aged, pre-pathology) tissues."""
    t = subject.template
    normal = ("gm", "wm", "csf", "bone", "soft", "air")
    best = subject.tissues["gm"].copy()
    kind = np.zeros(best.shape, np.int8)  # index into ``normal`` of the dominant tissue
    for i, k in enumerate(normal[1:], 1):
        more = subject.tissues[k] > best
        best[more] = subject.tissues[k][more]
        kind[more] = i
    out = np.zeros(t.aal.shape, np.int16)
    x_ras = (np.arange(t.aal.shape[0]) * GRID_AFFINE[0, 0] + GRID_AFFINE[0, 3])[:, None, None]
    wm = kind == 1
    out[wm & (x_ras < 0)] = TISSUE_CODES["white_matter_L"]
    out[wm & (x_ras >= 0)] = TISSUE_CODES["white_matter_R"]
    csf = kind == 2
    vent = csf & (t.ventricles | ((t.vent_dist <= subject.ventricle_mm) & (t.icv_depth > 6)))
    out[csf & ~vent] = TISSUE_CODES["csf"]
    out[vent] = TISSUE_CODES["ventricle"]
    out[kind == 3] = TISSUE_CODES["bone"]
    out[kind == 4] = TISSUE_CODES["soft_tissue"]
    grey = (t.aal > 0) & (kind == 0)
    out[grey] = t.aal[grey]
    return out


def anatomy_map(subject: Subject, spacing: float = SPACING_MM) -> nib.Nifti1Image:
    """The subject's label map on an axis-aligned scanner-RAS grid (``spacing`` mm) around the head."""
    from scipy import ndimage

    labels = subject_labels(subject)
    shape = tuple(int(round(f / spacing)) for f in FOV_MM)
    centre = subject.world_from_template[:3, :3] @ HEAD_CENTRE_TEMPLATE + subject.world_from_template[:3, 3]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - (np.array(shape) - 1) / 2 * spacing
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    ras = ijk * spacing + affine[:3, 3]
    tidx = subject.template_index(ras.reshape(-1, 3))
    vals = ndimage.map_coordinates(labels, tidx.T, order=0, mode="constant", cval=0)
    return nib.Nifti1Image(vals.reshape(shape).astype(np.int16), affine)


def write_anatomy_map(out: str, study_uid: str, subject: Subject) -> str:
    """Write ``OUT/anatomy/<study uid>.nii.gz`` atomically; returns the path relative to OUT."""
    rel = os.path.join("anatomy", f"{study_uid}.nii.gz")
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".nii.gz")] + ".part.nii.gz"
    nib.save(anatomy_map(subject), tmp)
    os.replace(tmp, path)
    return rel


def write_legend(path: str, template: Template) -> None:
    """``code,name,class`` for every code of the maps."""
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        fh.write("code,name,class\n")
        for code, (name, cls) in sorted(legend(template).items()):
            fh.write(f"{code},{name},{cls}\n")
    os.replace(tmp, path)


def read_legend(path: str) -> dict[int, tuple[str, str]]:
    with open(path) as fh:
        rows = [line.rstrip("\n").split(",") for line in fh][1:]
    return {int(c): (n, k) for c, n, k in rows if c}


__all__ = ["TISSUE_CODES", "anatomy_map", "legend", "read_legend", "region_class",
           "subject_labels", "write_anatomy_map", "write_legend"]
