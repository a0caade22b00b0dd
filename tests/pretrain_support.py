"""A small real token cache for encoder and pretraining tests: phantom DICOM series of several
patients (CT and MR, axial / coronal / sagittal) through the real ingest pipeline, with a keyed
splits file."""

from __future__ import annotations

import csv
import os

from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.privacy.keys import Keyer
from neurovfm.synth.dicom_writer import Identity
from neurovfm.synth.phantom import write_phantom_series
from neurovfm.tokens.cache import TokenCache

SPECS = [  # (modality, plane, slices, split)
    ("CT", "axial", 24, "train"), ("MR", "axial", 20, "train"), ("CT", "coronal", 30, "train"),
    ("MR", "sagittal", 26, "train"), ("CT", "axial", 18, "train"), ("MR", "coronal", 22, "train"),
    ("CT", "sagittal", 20, "val"), ("MR", "axial", 16, "test"),
]


def build_small_cache(root: str) -> tuple[str, str]:
    src = os.path.join(root, "dicom")
    for i, (mod, plane, n, _) in enumerate(SPECS):
        ident = Identity(patient_id=f"PT{i:04d}", patient_name=f"PATIENT^{i}", accession=f"ACC{i:05d}")
        write_phantom_series(os.path.join(src, f"s{i}"), plane, n=n, rows=160, cols=150, step=4.0,
                             modality=mod, identity=ident, seed=i)
    cache = os.path.join(root, "cache")
    keyer = Keyer(b"pretrain-test")
    run_ingest(src, cache, IngestOptions(progress=False), keyer=keyer)
    splits = {keyer.patient(f"PT{i:04d}"): sp for i, (_, _, _, sp) in enumerate(SPECS)}
    c = TokenCache(cache)
    rows = {(e.study_key, splits[e.patient_key]) for e in c.series()}
    c.close()
    path = os.path.join(root, "labels_keyed.csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_key", "split"])
        w.writerows(sorted(rows))
    return cache, path


def small_cache_with_model(root) -> tuple:
    """(root, cache, splits, model): the small cache and a random-init ViT-Tiny folder (seed 0)."""
    from neurovfm.cli import main as cli_main

    cache, splits = build_small_cache(str(root))
    model = str(root / "model")
    assert cli_main(["init-model", model, "--size", "tiny", "--seed", "0"]) == 0
    return root, cache, splits, model
