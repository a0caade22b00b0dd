"""``neurovfm synth --preview``: PNG montages of each study's series with lesion outlines.

Read back from the written DICOM files and mask NIfTIs (so the picture shows what ingestion
will see): CT in brain, blood and bone windows, MR contrasts with percentile scaling; the
slice shown is the one with the most lesion voxels (the middle slice for normal studies).
"""

from __future__ import annotations

import glob
import os

import nibabel as nib
import numpy as np
import pydicom


def _load_series(folder: str) -> np.ndarray:
    dss = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(folder, "*")))]
    normal = np.cross(np.array(dss[0].ImageOrientationPatient[:3], float), np.array(dss[0].ImageOrientationPatient[3:], float))
    dss.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    return np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in dss])


def write_previews(out: str, records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = os.path.join(out, "preview")
    os.makedirs(pdir, exist_ok=True)
    paths = []
    for r in records:
        panels = []
        for s in r["series"]:
            vol = _load_series(os.path.join(out, s["path"]))
            mask = np.transpose(np.asarray(nib.load(os.path.join(out, s["mask"])).dataobj), (2, 1, 0))
            counts = (mask > 0).sum(axis=(1, 2))
            k = int(np.argmax(counts)) if counts.max() > 0 else vol.shape[0] // 2
            if r["modality"] == "CT":
                wins = [("bone", 600, 2800)] if s["kind"] == "bone" else [("brain", 40, 80), ("blood", 80, 200)]
                for name, level, width in wins:
                    panels.append((f"{s['kind']} {name}", np.clip((vol[k] - level + width / 2) / width, 0, 1), mask[k]))
            else:
                lo, hi = np.percentile(vol, [0.5, 99.5])
                panels.append((s["kind"], np.clip((vol[k] - lo) / max(hi - lo, 1e-6), 0, 1), mask[k]))
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
        axes = np.atleast_1d(axes)
        for ax, (title, img, m) in zip(axes, panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if m.any():
                ax.contour(m > 0, levels=[0.5], colors="r", linewidths=0.6)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        labels = ", ".join(r["labels"]) or "normal"
        fig.suptitle(f"{r['modality']} study {r['study_uid'][-8:]}  [{r['triage']}]  {labels}"[:160], fontsize=8)
        path = os.path.join(pdir, f"{r['study_uid']}.png")
        fig.savefig(path, dpi=60)
        plt.close(fig)
        paths.append(path)
    return paths
