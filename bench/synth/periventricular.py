"""Why is CT small vessel disease invisible to the CNN? Density of the periventricular band on the
CNN's own inputs (3 x 3 x 4 mm or the file's finer grid, brain window), inside vs outside the lesion masks and across heads.

    python bench/synth/periventricular.py ARCHIVE INPUTS.npz   (NEUROVFM_SITE_SECRET as for the cache)

INPUTS.npz is difficulty.py's ``--inputs`` file. Prints (1) within positive heads, lesion voxels minus
the rest of the band (0-12 mm from CSF), in HU; (2) across heads, the AUROC of the band's mean density
(0-6 mm) minus deeper white matter (9-20 mm) for the label.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
from scipy import ndimage

from difficulty import AUX  # the voxel-target bits of the inputs file (this folder)

from neurovfm.eval.metrics import auroc
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.cnn3d import CT_CHANNELS, StudyGrid

LABEL = "small_vessel_ischemic_disease"
BIT = AUX.index(LABEL)
WINDOW_HU = {w.name: w.width for w in PreprocessPolicy().ct_windows}[CT_CHANNELS[0]]  # input 1.0 = this many HU
CSF_LEVEL = 0.16  # below this (about 13 HU in the brain window) after light smoothing: CSF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", help="the `neurovfm synth` archive (labels.csv)")
    ap.add_argument("inputs", help="difficulty.py's --inputs file (npz) made from that archive's cache")
    a = ap.parse_args()
    for path in (os.path.join(a.archive, "labels.csv"), a.inputs):
        if not os.path.isfile(path):
            ap.error(f"{path}: not found")
    archive, inputs = a.archive, a.inputs
    keyer = Keyer.from_site()
    with open(os.path.join(archive, "labels.csv"), newline="") as fh:
        pos = {keyer.study(r["study_uid"]): r.get(LABEL) == "1" for r in csv.DictReader(fh)}
    z = np.load(inputs, allow_pickle=False)
    grid_mm = StudyGrid.of(float(z["inplane_mm"]) if "inplane_mm" in z.files else 3.0).mm  # older files: 3 mm
    inside, y, shift = [], [], []
    for i, (key, mod) in enumerate(zip(z["keys"], z["mods"])):
        if mod != "CT" or str(key) not in pos:
            continue
        v = z[f"v{i}"][0].astype(np.float32)
        inner = ndimage.binary_erosion(v > 0, iterations=4)
        csf = ndimage.gaussian_filter(v, 0.7) < CSF_LEVEL
        d = ndimage.distance_transform_edt(~csf, sampling=grid_mm)
        soft = inner & (v < 0.8)
        y.append(pos[str(key)])
        shift.append(v[soft & (d > 0) & (d <= 6)].mean() - v[soft & (d > 9) & (d <= 20)].mean())
        if pos[str(key)]:
            m = ((z[f"m{i}"] >> BIT) & 1).astype(bool)
            band = soft & (d > 0) & (d <= 12)
            a, b = v[m & band], v[band & ~ndimage.binary_dilation(m)]
            if a.size > 10 and b.size > 10:
                inside.append((a.mean() - b.mean()) * WINDOW_HU)
    if not y or not inside:
        print(f"{inputs}: no CT head of {archive} under this NEUROVFM_SITE_SECRET (or none with {LABEL})",
              file=sys.stderr)
        return 2
    print(f"CT heads: {len(y)} ({int(np.sum(y))} with {LABEL})")
    print(f"lesion voxels minus the rest of the band, median over positive heads: {np.median(inside):+.1f} HU")
    print(f"band density minus deeper white matter as a study score: AUROC {auroc(np.array(y, float), -np.array(shift)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
