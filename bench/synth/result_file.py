"""Reading difficulty.py's result files: one reader for every script that collects them
(learning_curve.py, paired_seeds.py), so a missing, corrupt or unfinished file is refused the same
way everywhere, with its name and what is missing, instead of a KeyError from deep inside."""

from __future__ import annotations

import argparse
import json
import os
import sys

MODS = ("CT", "MR")


class ResultFileError(ValueError):
    """A difficulty.py result that cannot be used, named with the reason."""


def read_cnn_result(path: str, variant: str, setup_keys: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(the whole file, its ``variant`` result: "cnn" or "cnn_mask_aux") after checking that the
    result is finished: macro AUROC overall and per modality, per-label AUROCs, and ``setup_keys``."""
    try:
        with open(path) as fh:
            whole = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ResultFileError(f"{path}: cannot read a difficulty.py result ({exc})") from None
    r = whole.get(variant) if isinstance(whole, dict) else None
    try:
        float(r["macro"])
        for m in MODS:
            float(r[m]["macro"])
            dict(r[m]["auroc"])
        for k in setup_keys:
            r["setup"][k]
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultFileError(f"{path}: no finished '{variant}' result (missing {exc}); make it with "
                              "difficulty.py without --skip-cnn") from None
    return whole, r


def test_scores(path: str, result: dict) -> dict[str, dict]:
    """The per-study test scores a difficulty.py result keeps (since 2026-12-05): study key ->
    {"modality", "patient", "y", "score"}; older files have none and are refused by name."""
    kept = result.get("scores") or {}
    test = kept.get("test")
    if not (isinstance(test, dict) and test and all(isinstance(v, dict) and {"modality", "patient", "y", "score"} <= set(v)
                                                     for v in test.values())):
        raise ResultFileError(f"{path}: keeps no per-study test scores (made before 2026-12-05); rerun its command")
    n = len(kept.get("labels") or [])
    bad = next((k for k, v in test.items() if not n or len(v["score"]) != n or len(v["y"]) != n), None)
    if bad is not None:
        raise ResultFileError(f"{path}: study {bad}'s kept scores do not match the {n} labels the file names")
    return test


def write_record(path: str, record: dict) -> None:
    """Write a record JSON atomically (temporary file, then rename): a failed run leaves the old one."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
    os.replace(tmp, path)


def files_main(script: str, doc: str, files_help: str, compute, report) -> int:
    """The command line of a script that collects result files into one record: ``FILES ... [--variant V]
    --out RECORD``. ``compute(files, variant)`` builds the record (a ResultFileError refuses the run by
    name, exit 2, nothing written); ``report(record)`` prints it; the record keeps the command that made it."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help=files_help)
    ap.add_argument("--variant", default="cnn_mask_aux", help="which result of the files: cnn or cnn_mask_aux")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        res = compute(a.files, a.variant)
    except ResultFileError as e:
        print(f"{script}: {e}", file=sys.stderr)
        return 2
    res = {"command": f"python bench/synth/{script}.py " + " ".join(sys.argv[1:]), "variant": a.variant, **res}
    report(res)
    write_record(a.out, res)
    return 0
