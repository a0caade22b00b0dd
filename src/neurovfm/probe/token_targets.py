"""Token-level lesion targets for study heads, from lesion masks where a site has them.

Study labels alone did not teach heads *where* a finding is: on the default archive their maps
point at lesions barely above chance, while a linear probe given lesion masks finds lesion tokens
well (``eval.lesion_probe``). Many hospitals hold segmentations for a subset of studies (stroke
cores, haematomas, tumours); this module turns them into per-token targets aligned with a study's
bag (``FeatureStore.bag``), so that ``probe.train`` can add a token term to the study loss.

A token is a lesion token of label ``c`` when the mask at its centre (through the cache's token
grid affine) holds a lesion whose finding is ``c`` or implies ``c`` (``synth.tables`` parents:
a subdural haematoma is an intracranial haemorrhage). Masks come in the synthetic archive's
layout: ``records.jsonl`` (one study per line: ``study_uid``, ``patient_id``, ``split``,
``modality``, ``findings`` with ``label`` and ``mask_index``, ``series`` with ``series_uid`` and
``mask``) and the masks as NIfTI on each series' own grid; identifiers are keyed on reading, as
in the cache. Only the splits asked for (by default ``train``) are read: validation and test
never see a mask.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from neurovfm.errors import NeuroVFMError
from neurovfm.eval.anatomy import token_codes
from neurovfm.privacy.keys import Keyer
from neurovfm.probe.embed import FeatureStore
from neurovfm.synth import tables
from neurovfm.synth.rekey import series_identity
from neurovfm.tokens.cache import TokenCache


class TokenTargetError(NeuroVFMError):
    """The masks folder is unreadable or does not join the features."""


@dataclass
class StudyMasks:
    split: str
    modality: str
    masks: dict[str, str]  # series key -> mask path
    lesion_labels: dict[int, set[str]]  # mask index -> the labels its findings are or imply


def read_study_masks(archive: str, keyer: Keyer, splits: tuple[str, ...] = ("train",)) -> dict[str, StudyMasks]:
    """study key -> its series' masks and what each mask index means, for studies of ``splits``."""
    path = os.path.join(archive, "records.jsonl")
    if not os.path.isfile(path):
        raise TokenTargetError(f"{archive}: no records.jsonl (the lesion-mask manifest)")
    out: dict[str, StudyMasks] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if r["split"] not in splits:
                    continue
                mod = tables.normalize_modality(r["modality"])
                les: dict[int, set[str]] = {}
                for f in r["findings"]:
                    les.setdefault(int(f["mask_index"]), set()).update(tables.close_labels(mod, [f["label"]]))
                masks = {}
                for s in r["series"]:
                    m = os.path.join(archive, s["mask"])
                    if not os.path.isfile(m):
                        raise TokenTargetError(f"{m}: lesion mask missing ({path}, line {n})")
                    masks[keyer.series(series_identity(r["study_uid"], s["series_uid"]))] = m
                out[keyer.study(r["study_uid"])] = StudyMasks(r["split"], mod, masks, les)
            except (KeyError, TypeError, ValueError) as e:
                raise TokenTargetError(f"{path}, line {n}: not a study record ({type(e).__name__}: {e})") from None
    return out


def _read_mask(path: str) -> nib.Nifti1Image:
    """A lesion mask, in memory; an unreadable or non-3-D file is a TokenTargetError naming it."""
    try:
        raw = nib.load(path)
        data = np.asarray(raw.dataobj)
    except Exception as e:  # nibabel raises many kinds for a damaged file
        raise TokenTargetError(f"{path}: not a readable NIfTI lesion mask ({type(e).__name__}: {e})") from None
    if data.ndim != 3 or not np.issubdtype(data.dtype, np.integer):
        raise TokenTargetError(f"{path}: a lesion mask must be a 3-D integer volume, not {data.ndim}-D {data.dtype}")
    return nib.Nifti1Image(data, raw.affine)


def study_token_targets(store: FeatureStore, cache: TokenCache, study_key: str, sm: StudyMasks, labels: list[str],
                        views: list[str] | None = None, masks_read: dict | None = None) -> np.ndarray:
    """[n_tokens, C] bool, row-aligned with ``store.bag(study_key, views)``: token t is a lesion
    token of label ``labels[c]``. Series without a mask get all-False rows. ``masks_read``: masks
    already loaded (path -> image), filled as masks are read (a CT series has one view per window,
    all on one mask)."""
    col = {lab: j for j, lab in enumerate(labels)}
    parts = []
    for v in store.bag_views(study_key, views):
        t = np.zeros((len(v.coords), len(labels)), bool)
        mpath = sm.masks.get(v.series_key)
        if mpath is not None:
            try:
                entry = cache.get(v.series_key)
            except KeyError:
                raise TokenTargetError(f"{store.root}: series {v.series_key[:12]}… is not in the cache {cache.root}; "
                                       "give the cache these features were embedded from") from None
            img = masks_read.get(mpath) if masks_read is not None else None
            if img is None:
                img = _read_mask(mpath)
                if masks_read is not None:
                    masks_read[mpath] = img
            _, code = token_codes(entry.grid_affine_array, v.coords, img)
            for idx, labs in sm.lesion_labels.items():
                cols = [col[lab] for lab in labs if lab in col]
                if cols and idx > 0:
                    t[np.ix_(code == idx, cols)] = True
        parts.append(t)
    return np.concatenate(parts) if parts else np.zeros((0, len(labels)), bool)


def token_targets(store: FeatureStore, cache_dir: str, archive: str, study_keys: list[str], labels: list[str],
                  views: list[str] | None = None, keyer: Keyer | None = None,
                  splits: tuple[str, ...] = ("train",)) -> list[np.ndarray | None]:
    """Per study of ``study_keys`` (in order): its token targets, or None when the masks folder
    has no record of it in ``splits`` (that study then trains on its study labels only)."""
    keyer = keyer or Keyer.from_site()
    masks = read_study_masks(archive, keyer, splits)
    if not any(k in masks for k in study_keys):
        raise TokenTargetError(f"{archive}: none of the {len(study_keys)} studies has masks in split(s) "
                               f"{', '.join(splits)} (another archive, or another site secret?)")
    cache = TokenCache(cache_dir)
    try:  # masks are held per study only (a few hundred MB in all once decompressed)
        return [study_token_targets(store, cache, k, masks[k], labels, views, {}) if k in masks else None
                for k in study_keys]
    finally:
        cache.close()
