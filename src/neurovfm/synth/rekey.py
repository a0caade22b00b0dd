"""Re-key an archive's ground truth with the cache's keyed hashes.

``labels.csv`` and ``findings.jsonl`` are keyed by raw DICOM UIDs and patient ids (that is
what a hospital's report database holds). ``neurovfm rekey`` rewrites them with the same HMAC
keys the token cache uses, so they join with the cache while no raw UID, patient id or
free-text identifier enters it. Findings keep labels, sides, sizes, locations, the indication
and the report text (which the generator writes without names or dates).
"""

from __future__ import annotations

import csv
import json
import os

from neurovfm.privacy.keys import Keyer
from neurovfm.tokens.cache import atomic_write_text

RAW_COLUMNS = ("study_uid", "patient_id")


def series_identity(study_uid: str, series_uid: str) -> str:
    """The raw identity ingestion hashes for an unsplit series (see ``SeriesCandidate``)."""
    return f"{study_uid}\0{series_uid}\0{0}/{1}"


def rekey_archive(archive: str, out_dir: str, keyer: Keyer) -> tuple[str, str]:
    """Write ``labels_keyed.csv`` and ``findings_keyed.jsonl`` into ``out_dir``."""
    from neurovfm.errors import NeuroVFMError

    for name in ("labels.csv", "findings.jsonl"):
        if not os.path.exists(os.path.join(archive, name)):
            raise NeuroVFMError(f"{archive}: no {name}; is this a `neurovfm synth` archive?")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(archive, "labels.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    out_rows = []
    for r in rows:
        new = {"study_key": keyer.study(r["study_uid"]), "patient_key": keyer.patient(r["patient_id"])}
        new.update({k: v for k, v in r.items() if k not in RAW_COLUMNS})
        out_rows.append(new)
    import io

    buf = io.StringIO()
    if out_rows:
        w = csv.DictWriter(buf, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    labels_path = os.path.join(out_dir, "labels_keyed.csv")
    atomic_write_text(labels_path, buf.getvalue())
    lines = []
    with open(os.path.join(archive, "findings.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            study, patient = rec.pop("study_uid"), rec.pop("patient_id")
            rec["study_key"] = keyer.study(study)
            rec["patient_key"] = keyer.patient(patient)
            for s in rec.get("series", []):
                suid = s.pop("series_uid")
                s["series_key"] = keyer.series(series_identity(study, suid))
                s.pop("path", None)
                s.pop("mask", None)
            rec.pop("patient", None)
            rec.pop("anatomy", None)  # a path named by the raw study UID
            lines.append(json.dumps(rec))
    findings_path = os.path.join(out_dir, "findings_keyed.jsonl")
    atomic_write_text(findings_path, "\n".join(lines) + "\n")
    return labels_path, findings_path
