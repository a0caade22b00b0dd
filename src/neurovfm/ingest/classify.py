"""What a series is, from its headers: modality, MR sequence family, CT kernel class, flags.

Descriptions are free text and never stored; they are read here, in memory, as one of
several cues, together with coded values (ImageType, b-value, TR/TE/TI, kernel names).
The same rules classify NIfTI series from their BIDS sidecar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEQUENCE_FAMILIES = ("T1", "T1C", "T2", "FLAIR", "DWI", "ADC", "SWI", "PD", "other")
KERNEL_CLASSES = ("soft", "bone")

_SKIP_IMAGE_TYPES = {
    "LOCALIZER": ("localizer", "localizer / scout image"),
    "SCOUT": ("localizer", "localizer / scout image"),
    "MIP": ("projection", "maximum/minimum intensity projection"),
    "MAXIMUM": ("projection", "maximum/minimum intensity projection"),
    "MINIP": ("projection", "maximum/minimum intensity projection"),
    "PROJECTION IMAGE": ("projection", "projection image"),
    "SCREEN SAVE": ("screenshot", "screen save / screenshot"),
    "SCREENSHOT": ("screenshot", "screen save / screenshot"),
    "CAPTURE": ("screenshot", "screen capture"),
    "DOSE INFO": ("dose_report", "dose report image"),
    "COLOR": ("screenshot", "colour overlay image"),
}


@dataclass
class SeriesClass:
    modality: str  # "CT" or "MR"
    sequence: str  # MR family or "" for CT
    kernel: str  # "soft" / "bone" for CT, "" for MR
    contrast: bool
    cta: bool = False
    perfusion: bool = False


def skip_reason(image_type: tuple[str, ...], burned_in: bool, description: str) -> tuple[str, str] | None:
    """(code, reason) if policy excludes this series, else None. DERIVED\\PRIMARY is kept."""
    for t in image_type:
        if t in _SKIP_IMAGE_TYPES:
            return _SKIP_IMAGE_TYPES[t]
    if burned_in:
        return ("burned_in", "burned-in annotation")
    d = description
    if re.search(r"\b(scout|localizer|localiser|topogram|surview|3-?plane loc)\b", d):
        return ("localizer", "localizer / scout image (by description)")
    if re.search(r"\b(mip|minip|screen ?save|screenshot|dose report|3d render|vrt?)\b", d):
        return ("projection", "projection, rendering or screenshot (by description)")
    return None


def _has(d: str, *words: str) -> bool:
    return any(re.search(w, d) for w in words)


def mr_sequence(description: str, image_type: tuple[str, ...], b_value: float | None, tr: float | None,
                te: float | None, ti: float | None, contrast_agent: str, scanning_sequence: str = "",
                sequence_name: str = "") -> str:
    """MR sequence family from coded values first, then descriptions, then TR/TE/TI."""
    d = f"{description} {sequence_name}".lower()
    it = set(image_type)
    post = bool(contrast_agent) or _has(d, r"\bpost\b", r"\+ ?c\b", r"\bgad", r"\bgd\b", r"\bc\+", r"contrast", r"\bce[-_ ]")
    if "ADC" in it or _has(d, r"\badc\b", r"apparent diff"):
        return "ADC"
    if it & {"DIFFUSION", "TRACEW", "TRACE"} or (b_value is not None and b_value > 50) or _has(d, r"\bdwi\b", r"diff", r"\btrace", r"\bep2d_diff"):
        return "DWI"
    if "SWI" in it or _has(d, r"\bswi\b", r"\bswan\b", r"t2\*", r"\bt2star", r"\bgre\b.*\bhemo", r"susceptib"):
        return "SWI"
    named = []
    if _has(d, r"flair", r"\bdark ?fluid", r"\btirm"):
        named.append("FLAIR")
    if _has(d, r"\bpd\b", r"proton density", r"\bpdw"):
        named.append("PD")
    if _has(d, r"\bt2\b", r"t2w", r"\bt2_", r"_t2\b", r"\btse\b.*t2", r"\bfse\b.*t2"):
        named.append("T2")
    if _has(d, r"\bt1\b", r"t1w", r"\bt1_", r"_t1\b", r"mprage", r"\bspgr", r"\bbravo", r"\bmp-?rage", r"\bvibe", r"\bflash"):
        named.append("T1C" if post else "T1")
    if len(named) == 1:
        return named[0]
    if set(named) == {"PD", "T2"} and te is not None:  # dual-echo series: the echo decides
        return "T2" if te >= 60 else "PD"
    if named:
        return named[0]
    # acquisition parameters (ms)
    if tr is not None and te is not None:
        if ti is not None and ti > 1500 and tr > 5000:
            return "FLAIR"
        if tr > 1800 and te >= 70:
            return "T2"
        if tr > 1800 and te < 40 and (ti is None or ti < 100):
            return "PD"
        if tr < 1000 and te < 30 or (ti is not None and 300 < ti < 1300 and tr < 3500):
            return "T1C" if post else "T1"
    return "other"


_BONE_KERNEL = re.compile(
    r"bone|sharp|lung|detail|edge|ultra|\bhr\d|\bbr6|\bbr7|\bur\d|\by[ab]\b|\bfc(3\d|5\d|8\d)\b|\bd\b|\bl\b|\bhead ?bone|boneplus|\bsr\d"
)
_SIEMENS_KERNEL = re.compile(r"^[a-z]{1,2}(\d{2})[a-z]?$")


def ct_kernel(kernel: str, description: str, window_center: float | None) -> str:
    """'bone' for sharp (bone/lung) reconstructions, else 'soft'."""
    k = kernel.lower().strip()
    if k:
        m = _SIEMENS_KERNEL.match(k.split("\\")[0])
        if m:  # Siemens-style letter + sharpness number: >= 60 is a bone/sharp kernel
            return "bone" if int(m.group(1)) >= 60 else "soft"
        if _BONE_KERNEL.search(k):
            return "bone"
        if re.search(r"soft|standard|std|brain|head|smooth|\bfc[0-2]\d|\bub|\bfc4\d", k):
            return "soft"
    if re.search(r"\bbone\b|\bsharp\b", description):
        return "bone"
    if window_center is not None and window_center >= 300:
        return "bone"
    return "soft"


def classify(modality: str, attrs: dict, image_type: tuple[str, ...], b_value: float | None,
             echo_time: float | None) -> SeriesClass:
    d = attrs.get("_description", "")
    if modality == "CT":
        cta = _has(d, r"\bcta\b", r"angio", r"\bcow\b", r"circle of willis") or "ANGIO" in image_type
        perf = _has(d, r"perf", r"\bctp\b") or "PERFUSION" in image_type
        contrast = bool(attrs.get("_contrast_agent")) or cta or _has(d, r"\bc\+", r"with contrast", r"\bpost\b", r"\bcontrast\b(?! *-)")
        if _has(d, r"without contrast", r"\bnon[- ]?con", r"\bw/?o\b", r"\bc-"):
            contrast = bool(attrs.get("_contrast_agent")) or cta
        return SeriesClass("CT", "", ct_kernel(attrs.get("_kernel", ""), d, attrs.get("_window_center")),
                           contrast, cta=cta, perfusion=perf)
    seq = mr_sequence(d, image_type, b_value, attrs.get("repetition_time_ms"), echo_time,
                      attrs.get("inversion_time_ms"), attrs.get("_contrast_agent", ""),
                      attrs.get("_scanning_sequence", ""), attrs.get("_sequence_name", ""))
    contrast = seq == "T1C" or bool(attrs.get("_contrast_agent"))
    return SeriesClass("MR", seq, "", contrast)
