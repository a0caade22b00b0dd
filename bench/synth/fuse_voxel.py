"""Does the voxel head's peak add to the study head? The two scores fused with scales fixed on
validation, scored once on test, against the study head alone on the same networks.

    python bench/synth/fuse_voxel.py R_S0.json [R_S1.json ...] [--variant cnn_mask_aux] --out RECORD.json

Mask-supervised difficulty.py runs (since commit b1ea96b) keep every validation and test study's
study-head logits and the voxel head's per-class maxima. Where the voxel head's maximum out-ranks
the study head on a label (MRI stroke and small vessel disease on the default archive), the network
has seen the lesion but its study head has not used it; feeding the peak into the head during
training did not help (``--seg-to-head``), since on the training studies both fit the labels.
Fused score, for every headline label with a voxel class (``scores.voxel_labels``): the mean of
the two scores, each standardised by its own validation mean and SD within the modality (nothing
fitted on labels: the pre-declared primary). Secondary: a per-label logistic regression on the two
standardised scores fitted on the validation labels. Labels without a voxel class (atrophy) keep
the study head's score. Reported: test macro AUROC per modality and their mean for head, fused and
fitted, per file and for the files' mean (a seed ensemble), and the paired patient bootstrap of
fused - head over all files (``eval.metrics.replicate_paired_bootstrap``), and for the ensemble (or
the one file) each kind's macro per modality and their mean with patient-bootstrap intervals
(``eval.metrics.joint_macro_bootstrap``). Each file's head-alone macro is checked against what it reports.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from result_file import MODS, ResultFileError, files_main, read_cnn_result, test_scores  # this folder
from score_ensemble import score  # this folder: difficulty.py's macro over kept scores

from neurovfm.eval.metrics import joint_macro_bootstrap, replicate_paired_bootstrap

KINDS = ("head", "fused", "fitted")


def load(path: str, variant: str) -> dict:
    """The file's kept scores, refused by name unless every validation and test study has its
    voxel-head maxima."""
    whole, r = read_cnn_result(path, variant)
    test_scores(path, r)
    sc = r["scores"]
    vl = sc.get("voxel_labels")
    rows = [v for split in ("val", "test") for v in (sc.get(split) or {}).values()]
    if not vl or not sc.get("val") or any(len(v.get("voxel_max") or []) != len(vl) for v in rows):
        raise ResultFileError(f"{path}: keeps no voxel-head maxima for every validation and test study (made "
                              "before commit b1ea96b, or without --aux-weight); rerun its command")
    return {"file": os.path.basename(path), "command": whole.get("command", ""), "result": r}


def _z(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean()) / max(float(ref.std()), 1e-6)


def fuse_one(run: dict) -> dict[str, dict]:
    """Per modality: test keys (sorted), labels y, patients, and the three scores [n, labels]."""
    from sklearn.linear_model import LogisticRegression

    sc = run["result"]["scores"]
    labels, vlabels = sc["labels"], sc["voxel_labels"]
    out = {}
    for mod in MODS:
        split = {s: sorted(k for k, v in sc[s].items() if v["modality"] == mod) for s in ("val", "test")}
        arr = {s: {f: np.array([sc[s][k][f] for k in split[s]], float) for f in ("y", "score", "voxel_max")}
               for s in split}
        head = arr["test"]["score"]
        fused, fitted = head.copy(), head.copy()
        for j, h in enumerate(labels):
            if h not in vlabels:
                continue
            v = vlabels.index(h)
            zh = [_z(arr[s]["score"][:, j], arr["val"]["score"][:, j]) for s in ("val", "test")]
            zv = [_z(arr[s]["voxel_max"][:, v], arr["val"]["voxel_max"][:, v]) for s in ("val", "test")]
            fused[:, j] = (zh[1] + zv[1]) / 2
            yv = arr["val"]["y"][:, j]
            if 0 < yv.sum() < len(yv):
                clf = LogisticRegression(C=1.0, class_weight="balanced").fit(np.c_[zh[0], zv[0]], yv)
                fitted[:, j] = clf.decision_function(np.c_[zh[1], zv[1]])
            else:
                fitted[:, j] = fused[:, j]
        out[mod] = {"keys": split["test"], "y": arr["test"]["y"], "patients": [sc["test"][k]["patient"] for k in split["test"]],
                    "head": head, "fused": fused, "fitted": fitted}
    return out


def summarise(fz: dict[str, dict], labels: list[str]) -> dict:
    """Test macro AUROC per modality and their mean for each kind of score (score_ensemble.score)."""
    return {kind: score({k: {"modality": mod, "y": list(y)} for mod in MODS for k, y in zip(fz[mod]["keys"], fz[mod]["y"])},
                        {k: row for mod in MODS for k, row in zip(fz[mod]["keys"], fz[mod][kind])}, labels)
            for kind in KINDS}


def run(paths: list[str], variant: str) -> dict:
    runs = [load(p, variant) for p in paths]
    labels = runs[0]["result"]["scores"]["labels"]
    fused = []
    for r in runs:
        if r["result"]["scores"]["labels"] != labels:
            raise ResultFileError(f"{r['file']}: scores other labels than {runs[0]['file']}")
        fz = fuse_one(r)
        for mod in MODS:
            if fused and fz[mod]["keys"] != fused[0][mod]["keys"]:
                raise ResultFileError(f"{r['file']} scored other {mod} test studies than {runs[0]['file']}: "
                                      "not the same archive and split")
        own = summarise(fz, labels)["head"]
        for mod in MODS:
            m = own[mod]["macro"]
            if abs(m - float(r["result"][mod]["macro"])) > 1e-6:
                raise ResultFileError(f"{r['file']}: its kept {mod} scores give macro AUROC {m:.4f}, the file reports "
                                      f"{float(r['result'][mod]['macro']):.4f}")
        fused.append(fz)
    out = {"labels": labels, "files": [{"file": r["file"], "command": r["command"], **summarise(f, labels)}
                                       for r, f in zip(runs, fused)]}
    mean = {mod: {**fused[0][mod], **{k: np.mean([f[mod][k] for f in fused], 0) for k in KINDS}} for mod in MODS}
    out["ensemble"] = summarise(mean, labels) if len(fused) > 1 else None
    # the reported model's (the ensemble's, or the one file's) macro with a patient-bootstrap interval: CT
    # and MRI studies of one patient are drawn together, so the CT + MRI mean has an interval too
    final = mean if len(fused) > 1 else fused[0]
    out["intervals"] = {kind: joint_macro_bootstrap({mod: (final[mod]["y"], final[mod][kind], final[mod]["patients"])
                                                     for mod in MODS}, n=2000, seed=0) for kind in KINDS}
    out["paired_bootstrap"] = {}
    for kind in ("fused", "fitted"):
        out["paired_bootstrap"][f"{kind}_minus_head"] = {}
        for mod in MODS:
            b = replicate_paired_bootstrap(fused[0][mod]["y"], [f[mod][kind] for f in fused],
                                           [f[mod]["head"] for f in fused], fused[0][mod]["patients"], n=2000, seed=0)
            out["paired_bootstrap"][f"{kind}_minus_head"][mod] = {k: b[k] for k in ("estimate", "low", "high", "resamples")} | {
                "patients": len(set(fused[0][mod]["patients"]))}
    return out


def report(res: dict) -> None:
    rows = [(f["file"], f) for f in res["files"]] + ([("ensemble", res["ensemble"])] if res["ensemble"] else [])
    for name, f in rows:
        print(f"{name}: " + "  ".join(f"{k} {f[k]['macro']:.3f} (CT {f[k]['CT']['macro']:.3f}, MR {f[k]['MR']['macro']:.3f})"
                                      for k in KINDS))
    for kind, iv in res["intervals"].items():
        print(f"{'ensemble' if res['ensemble'] else 'file'} {kind}: " + "  ".join(
            f"{part} {b['estimate']:.3f} [{b['low']:.3f}, {b['high']:.3f}]" for part, b in iv.items()))
    for kind, part in res["paired_bootstrap"].items():
        for mod, b in part.items():
            print(f"{kind} {mod}: {b['estimate']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}] (patient bootstrap, {b['patients']} patients)")


def main() -> int:
    return files_main("fuse_voxel", __doc__, "mask-supervised difficulty.py results that keep voxel-head maxima", run, report)


if __name__ == "__main__":
    sys.exit(main())
