"""Slices for the viewer, cut on the server from the saved NIfTI files.

Each volume is turned to the closest RAS orientation through its affine (axes permuted and
flipped, never resampled), so every plane is shown the radiological way whatever order the
scanner stored the voxels in: axial and coronal with the patient's right on the screen's left,
sagittal with anterior on the left. The edge letters come from the same orientation, so the L/R
markers cannot disagree with the pixels. Maps (uint8, scale 1/255) are cut the same way.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
# (through-plane RAS axis, screen edge letters left/right/top/bottom)
_PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_MARKS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
CT_WINDOWS = {"brain": (80.0, 40.0), "subdural": (200.0, 80.0), "bone": (2800.0, 600.0)}  # width, level
MIN_REFORMAT = 8  # a plane is offered when both of its in-plane axes have at least this many voxels
MAP_FLOOR = 0.05  # map values below this share of the volume's peak are not drawn (as in the PNG montages)
MAP_ALPHA = 140


@dataclass
class Volume:
    """A NIfTI volume in RAS+ voxel order: ``data[x, y, z]`` with x toward the patient's right."""

    data: np.ndarray
    affine: np.ndarray  # voxel -> RAS of ``data``

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    _auto: tuple[float, float] | None = None
    _peak: float | None = None

    def auto_window(self) -> tuple[float, float]:
        """MR (or any) display range: 1st to 99.5th percentile, as the PNG montages use."""
        if self._auto is None:
            v = self.data.ravel()[:: max(1, self.data.size // 2_000_000)]
            lo, hi = np.percentile(v, [1, 99.5])
            self._auto = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
        return self._auto

    def peak(self) -> float:
        if self._peak is None:
            self._peak = float(self.data.max()) if self.data.size else 0.0
        return self._peak


def load(path: str, kind: str = "image") -> Volume:
    """Read a NIfTI and turn it to RAS+ voxel order. ``kind="map"`` keeps the stored uint8."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    img = nib.load(path)
    if kind == "map":
        data = np.asarray(img.dataobj.get_unscaled())
    else:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3:
        data = data.reshape(data.shape[:3])
    aff = np.asarray(img.affine, np.float64)
    ornt = io_orientation(aff)
    out = apply_orientation(data, ornt)
    return Volume(np.ascontiguousarray(out), aff @ inv_ornt_aff(ornt, data.shape))


def plane_info(vol: Volume, plane: str) -> dict | None:
    """Size and pixel spacing of one plane's slices, or None when the volume is too thin for it."""
    through = _PLANE_AXIS[plane]
    cols, rows = [a for a in (0, 1, 2) if a != through]  # shown as screen columns / rows
    sh, sp = vol.data.shape, vol.spacing
    if sh[cols] < MIN_REFORMAT or sh[rows] < MIN_REFORMAT:
        return None
    left, right, top, bottom = _MARKS[plane]
    return {"count": int(sh[through]), "width": int(sh[cols]), "height": int(sh[rows]),
            "col_mm": round(float(sp[cols]), 4), "row_mm": round(float(sp[rows]), 4),
            "marks": {"left": left, "right": right, "top": top, "bottom": bottom}}


def cut(vol: Volume, plane: str, index: int) -> np.ndarray:
    """One slice as shown on screen: [rows, cols] (see the module doc for the orientation)."""
    through = _PLANE_AXIS[plane]
    n = vol.data.shape[through]
    if not 0 <= index < n:
        raise IndexError(f"slice {index} is outside 0..{n - 1}")
    s = np.take(vol.data, index, axis=through)  # axial (x, y), coronal (x, z), sagittal (y, z)
    # every plane: first axis runs toward R / R / A, shown right-to-left; second toward A / S / S, shown bottom-up
    return s[::-1, ::-1].T


def slice_centre_ras(vol: Volume, plane: str, index: int) -> np.ndarray:
    c = (np.array(vol.data.shape, np.float64) - 1) / 2
    c[_PLANE_AXIS[plane]] = index
    return vol.affine[:3, :3] @ c + vol.affine[:3, 3]


def window_u8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


def window_range(vol: Volume, name: str) -> tuple[float, float]:
    if name in CT_WINDOWS:
        w, level = CT_WINDOWS[name]
        return level - w / 2, level + w / 2
    if name == "auto":
        return vol.auto_window()
    raise KeyError(name)


def overlay_rgba(map_slice: np.ndarray, peak: float) -> np.ndarray:
    """A map slice (stored uint8) as a 'hot' RGBA overlay scaled to the volume's peak."""
    v = map_slice.astype(np.float32) / max(peak, 1.0)
    rgba = np.zeros(v.shape + (4,), np.uint8)
    rgba[..., 0] = np.clip(3 * v, 0, 1) * 255
    rgba[..., 1] = np.clip(3 * v - 1, 0, 1) * 255
    rgba[..., 2] = np.clip(3 * v - 2, 0, 1) * 255
    rgba[..., 3] = np.where(v >= MAP_FLOOR, MAP_ALPHA, 0)
    return rgba


def peak_slices(vol: Volume) -> dict[str, int]:
    """Per plane, the slice holding most of a map's mass (where the viewer goes when it is shown)."""
    d = vol.data.astype(np.float64)
    out = {}
    for plane, ax in _PLANE_AXIS.items():
        mass = d.sum(axis=tuple(a for a in (0, 1, 2) if a != ax))
        out[plane] = int(np.argmax(mass)) if mass.sum() > 0 else int(d.shape[ax] // 2)
    return out


class VolumeCache:
    """The last few volumes read (a viewer scrolls through the same one); thread-safe."""

    def __init__(self, size: int = 6):
        self.size = size
        self._items: OrderedDict[tuple, Volume] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, kind: str = "image") -> Volume:
        st = os.stat(path)
        key = (path, kind, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        vol = load(path, kind)
        with self._lock:
            self._items[key] = vol
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return vol

    def forget(self, prefix: str) -> None:
        with self._lock:
            for k in [k for k in self._items if k[0].startswith(prefix)]:
                del self._items[k]
