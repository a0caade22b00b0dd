"""The archive-difficulty bench's learning curve: the training subsets it draws and the results it
accepts (bench/synth/difficulty.py, bench/synth/learning_curve.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from neurovfm.eval.metrics import auroc
from neurovfm.probe import cnn3d as C

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "synth")


def _load(name: str):
    if BENCH not in sys.path:  # the scripts import their folder's helpers, as when run from it
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_synth_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def difficulty():
    return _load("difficulty")


def _labels():
    # 30 train patients with 1-3 studies each, plus validation and test studies
    labels, k = {}, 0
    for p in range(30):
        for _ in range(1 + p % 3):
            labels[f"s{k}"] = {"split": "train", "patient": f"p{p}"}
            k += 1
    for i in range(10):
        labels[f"v{i}"] = {"split": "val", "patient": f"q{i}"}
        labels[f"t{i}"] = {"split": "test", "patient": f"r{i}"}
    return labels


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_train_subset_keeps_whole_patients_and_only_train(difficulty, fraction):
    labels = _labels()
    keys = list(labels)
    sub = difficulty.train_subset(labels, keys, fraction, seed=0)
    kept = {labels[k]["patient"] for k in sub}
    assert len(kept) == round(fraction * 30)
    assert all(labels[k]["split"] == "train" for k in sub)
    # every study of a kept patient is in, none of the others
    assert set(sub) == {k for k in keys if labels[k]["split"] == "train" and labels[k]["patient"] in kept}
    assert difficulty.train_subset(labels, keys, fraction, seed=0) == sub  # seeded
    assert difficulty.train_subset(labels, keys, fraction, seed=1) != sub


def test_train_subset_whole_split_and_bad_fraction(difficulty):
    labels = _labels()
    train = [k for k in labels if labels[k]["split"] == "train"]
    assert difficulty.train_subset(labels, list(labels), 1.0) == train
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="train fraction"):
            difficulty.train_subset(labels, list(labels), bad)


def _result(fraction: float, macro: float) -> dict:
    per = {"CT": {"macro": macro, "auroc": {"a": macro}}, "MR": {"macro": macro, "auroc": {"a": macro}}}
    return {"cnn": {"macro": macro, **per, "setup": {"train_fraction": fraction, "epochs": int(100 / fraction),
                                                     "n_train_studies": {"CT": int(150 * fraction), "MR": 20}}}}


def test_learning_curve_points_sorted_and_bad_files_named(tmp_path):
    lc = _load("learning_curve")
    paths = []
    for f, m in ((1.0, 0.7), (0.25, 0.6), (0.5, 0.65)):
        paths.append(str(tmp_path / f"r{f}.json"))
        with open(paths[-1], "w") as fh:
            json.dump(_result(f, m), fh)
    pts = lc.points(paths)
    assert [p["train_fraction"] for p in pts] == [0.25, 0.5, 1.0]
    assert [p["n_train_studies"]["CT"] for p in pts] == [37, 75, 150] and pts[0]["macro"] == 0.6
    with pytest.raises(lc.CurveInputError, match="share a train fraction"):
        lc.points(paths + paths[:1])
    no_cnn = tmp_path / "no_cnn.json"
    no_cnn.write_text(json.dumps({"histogram_lr": {}}))
    with pytest.raises(lc.CurveInputError, match="no_cnn.json"):
        lc.points([str(no_cnn)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(lc.CurveInputError, match="broken.json"):
        lc.points([str(broken)])
    with pytest.raises(lc.CurveInputError, match="missing.json"):
        lc.points([str(tmp_path / "missing.json")])


def test_training_columns_headline_first_then_counted_on_train_only(difficulty):
    """Multi-task columns: headline labels lead (their logits are the ones scored); another
    column joins only with enough positive *training* studies of this modality (validation and
    test positives and blank cells of the other modality's labels do not count)."""
    nan = float("nan")
    head = {h: 0.0 for h in difficulty.HEADLINE}
    labels = {
        "a": {"split": "train", "all": {**head, "sdh": 1.0, "cyst": 1.0, "mr_only": nan}},
        "b": {"split": "train", "all": {**head, "sdh": 1.0, "cyst": 0.0, "mr_only": nan}},
        "c": {"split": "train", "all": {**head, "sdh": 0.0, "cyst": 0.0, "mr_only": nan}},
        "v": {"split": "val", "all": {**head, "sdh": 0.0, "cyst": 1.0, "mr_only": 1.0}},
    }
    train = ["a", "b", "c"]
    assert difficulty.training_columns(labels, train, 2) == list(difficulty.HEADLINE) + ["sdh"]
    assert difficulty.training_columns(labels, train, 1) == list(difficulty.HEADLINE) + ["cyst", "sdh"]
    assert difficulty.training_columns(labels, train, 3) == list(difficulty.HEADLINE)


def _cnn_world(tmp_path, difficulty):
    """12 CT + 12 MR studies (train/val/test by patient) with random volumes in the bench's
    inputs-file format, so run_cnn trains without a cache."""
    rng = np.random.default_rng(0)
    labels, studies, vols, mods = {}, {}, [], []
    for i in range(24):
        mod = "CT" if i < 12 else "MR"
        k = f"s{i}"
        split = ("train",) * 6 + ("val",) * 3 + ("test",) * 3
        y = rng.integers(0, 2, len(difficulty.HEADLINE)).astype(np.float32)
        labels[k] = {"split": split[i % 12], "modality": mod, "patient": f"p{i}", "y": y,
                     "all": {**dict(zip(difficulty.HEADLINE, map(float, y))), "extra": float(i % 2)}}
        studies[k] = [SimpleNamespace(age_years=50 + i)]
        ch = len(C.CT_CHANNELS) if mod == "CT" else len(C.MR_CHANNELS)
        vols.append(rng.random((ch,) + C.GRID).astype(np.float16))
        mods.append(mod)
    path = str(tmp_path / "inputs.npz")
    np.savez(path, keys=np.array(list(labels)), mods=np.array(mods), **{f"v{i}": v for i, v in enumerate(vols)})
    return labels, studies, path


def test_seed_ensemble_reports_members_and_reproduces_a_single_run(difficulty, tmp_path):
    """``seeds`` > 1: one network per seed on the same data; member seed 0 is exactly the
    single-seed run (deterministic training), and the multi-task columns lead with the headline."""
    labels, studies, path = _cnn_world(tmp_path, difficulty)
    kw = dict(epochs=1, batch=3, inputs_file=path, threads=1)
    one = difficulty.run_cnn(None, studies, labels, **kw)
    ens = difficulty.run_cnn(None, studies, labels, seeds=2, **kw)
    assert [m["seed"] for m in ens["members"]] == [0, 1]
    assert ens["members"][0]["macro"] == pytest.approx(one["macro"])
    assert ens["setup"]["seeds"] == 2 and "members" not in one
    mt = difficulty.run_cnn(None, studies, labels, min_positives=1, **kw)
    assert mt["setup"]["training_labels"]["CT"] == list(difficulty.HEADLINE) + ["extra"]
    with pytest.raises(ValueError, match="seeds"):
        difficulty.run_cnn(None, studies, labels, seeds=0, **kw)


def test_inputs_file_is_refused_for_the_other_sampling(difficulty, tmp_path):
    """An --inputs file remembers whether its volumes were anti-aliased: reusing it for the other
    setting would silently train on the wrong inputs, so it is refused with the file's name, and a
    seed other than 0 is recorded in the result."""
    labels, studies, path = _cnn_world(tmp_path, difficulty)
    kw = dict(epochs=1, batch=3, inputs_file=path, threads=1)
    with pytest.raises(SystemExit, match="inputs.npz.*antialias=False"):
        difficulty.run_cnn(None, studies, labels, antialias=True, **kw)
    z = dict(np.load(path))
    aa = str(tmp_path / "inputs_aa.npz")
    np.savez(aa, antialias=np.array(True), **z)
    r = difficulty.run_cnn(None, studies, labels, antialias=True, seed=3, **{**kw, "inputs_file": aa})
    assert r["setup"]["antialias"] is True and r["setup"]["seed"] == 3
    with pytest.raises(SystemExit, match="inputs_aa.npz.*antialias=True"):
        difficulty.run_cnn(None, studies, labels, **{**kw, "inputs_file": aa})


def test_inputs_file_is_refused_for_another_grid_and_scores_are_kept(difficulty, tmp_path):
    """An --inputs file built on the 3 mm grid is refused for a 2 mm run (its volumes would not fit
    the network's grid), with the file named; a run keeps each validation and test study's
    headline scores (and no training study's), so two settings can be compared study by study."""
    labels, studies, path = _cnn_world(tmp_path, difficulty)
    kw = dict(epochs=1, batch=3, inputs_file=path, threads=1)
    with pytest.raises(SystemExit, match="inputs.npz.*3 mm grid.*2 mm"):
        difficulty.run_cnn(None, studies, labels, inplane_mm=2.0, **kw)
    r = difficulty.run_cnn(None, studies, labels, **kw)
    sc = r["scores"]
    assert sc["labels"] == list(difficulty.HEADLINE)
    for split in ("test", "val"):
        assert set(sc[split]) == {k for k in labels if labels[k]["split"] == split}
        for k, v in sc[split].items():
            assert len(v["score"]) == len(difficulty.HEADLINE) and all(np.isfinite(v["score"]))
            assert v["y"] == list(labels[k]["y"]) and (v["modality"], v["patient"]) == (labels[k]["modality"], labels[k]["patient"])
    # the stored test scores are the ones the reported AUROCs come from
    from neurovfm.eval.metrics import auroc
    checked = 0
    for mod in ("CT", "MR"):
        ks = [k for k in sc["test"] if labels[k]["modality"] == mod]
        for j, h in enumerate(difficulty.HEADLINE):
            yv = np.array([labels[k]["y"][j] for k in ks])
            if 0 < yv.sum() < len(yv):
                assert r[mod]["auroc"][h] == pytest.approx(auroc(yv, np.array([sc["test"][k]["score"][j] for k in ks])))
                checked += 1
    assert checked >= 4
    assert r["setup"]["grid"] == C.GRID and r["setup"]["grid_mm"] == C.GRID_MM


@pytest.mark.parametrize("argv, why", [
    (["--only-cnn", "--skip-cnn"], "nothing left to measure"),
    (["--only-cnn", "--skip-labels-only", "--aux-weight", "0"], "needs --aux-weight > 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--min-positives", "-1"], "--min-positives must be >= 0"),
    (["--rotate-deg", "90"], "rotate_deg must be in"),
    (["--scale", "0.7"], "scale in"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--inplane-mm", "0.5"], "in-plane spacing must be in"),
    (["--seg-to-head"], "--seg-to-head applies to the mask-supervised CNN only"),
    (["--seg-to-head", "--skip-labels-only", "--aux-weight", "0"], "needs --aux-weight > 0"),
])
def test_bench_refuses_bad_options_before_reading_anything(difficulty, monkeypatch, tmp_path, capsys, argv, why):
    """Refused at once with the reason (ARCHIVE and CACHE do not even exist): an option set that
    measures nothing used to write an empty result over the recorded one, and a bad augmentation
    setting failed with a traceback only after minutes of loading."""
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["difficulty.py", str(tmp_path / "no_archive"), str(tmp_path / "no_cache"),
                                     "--out", str(out), *argv])
    with pytest.raises(SystemExit):
        difficulty.main()
    assert why in capsys.readouterr().err and not out.exists()


def _difficulty_result(path, seed: int, macro_ct: float, macro_mr: float, epochs: int = 100, drop: str = ""):
    """A difficulty.py-shaped result file with one mask-supervised CNN result (``drop``: leave out
    the MRI result's field of that name, as an unfinished run would)."""
    auroc = {h: macro_ct for h in ("a", "b")}
    r = {"CT": {"macro": macro_ct, "auroc": auroc}, "MR": {"macro": macro_mr, "auroc": {h: macro_mr for h in ("a", "b")}},
         "macro": (macro_ct + macro_mr) / 2,
         "setup": {"seed": seed, "epochs": epochs, "aux_weight": 1.0, "grid": [40, 72, 60], "train_fraction": 1.0,
                   "training_labels": {"CT": ["a", "b"], "MR": ["a", "b"]}}}
    r["MR"].pop(drop, None)
    path.write_text(json.dumps({"command": f"difficulty.py --seed {seed}", "cnn_mask_aux": r}))
    return str(path)


def test_paired_seeds_differences_and_t_interval(tmp_path, monkeypatch, capsys):
    """Seeds are paired by the seed each file records (not by argument order); the record holds each
    seed's difference, their t interval and each run's own command; mismatched or unpaired runs are refused
    with the file named and nothing written."""
    ps = _load("paired_seeds")
    a = [_difficulty_result(tmp_path / f"a{s}.json", s, 0.80 + 0.01 * s, 0.70 + 0.02 * s) for s in range(3)]
    b = [_difficulty_result(tmp_path / f"b{s}.json", s, 0.78 + 0.01 * s, 0.71 + 0.02 * s) for s in (2, 0, 1)]
    out = tmp_path / "rec.json"
    monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", *a, "--b", *b, "--names", "aa,pt", "--out", str(out)])
    assert ps.main() == 0
    rec = json.loads(out.read_text())
    assert rec["seeds"] == [0, 1, 2]
    assert [r["CT"]["difference"] for r in rec["per_seed"]] == pytest.approx([0.02, 0.02, 0.02])
    t = rec["difference_t95"]["MR"]
    assert t["estimate"] == pytest.approx(-0.01) and t["low"] == pytest.approx(-0.01) and t["df"] == 2
    assert rec["mean"]["aa"]["CT"] == pytest.approx(0.81) and rec["per_label_mean"]["pt"]["MR"]["a"] == pytest.approx(0.73)
    assert [r["command"] for r in rec["runs"]["pt"]] == [f"difficulty.py --seed {s}" for s in range(3)]
    bad = _difficulty_result(tmp_path / "b_e30.json", 1, 0.7, 0.7, epochs=30)
    for files_a, files_b, why in (
            (a, [b[1], bad], "b_e30.json differ in 'epochs'"),
            ([a[0]], [b[1]], "at least two seeds"),
            ([a[0], a[0]], b, "a0.json: seed 0 is already given"),
            (a, [str(tmp_path / "missing.json")], "missing.json: cannot read"),
            (a, [_difficulty_result(tmp_path / "no_auroc.json", 0, 0.7, 0.7, drop="auroc")], "no_auroc.json: no finished")):
        out2 = tmp_path / "none.json"
        monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", *files_a, "--b", *files_b, "--out", str(out2)])
        assert ps.main() == 2
        assert why in capsys.readouterr().err and not out2.exists()


def _scored_result(path, seed: int, signal: float, grid=(40, 72, 60), n: int = 120, drop_study: bool = False):
    """A difficulty.py-shaped result whose per-study test scores carry ``signal`` (labels and
    patients fixed across files: 2 studies per patient, so resampling is by patient)."""
    rng = np.random.default_rng(100)
    y = rng.integers(0, 2, (2 * n, 2)).astype(float)
    noise = np.random.default_rng(seed + 1000 * int(signal * 10)).normal(0, 1, y.shape)
    s = signal * y + noise
    test = {f"s{i}": {"modality": "CT" if i < n else "MR", "patient": f"p{i // 2}", "y": list(y[i]), "score": list(s[i])}
            for i in range(2 * n) if not (drop_study and i == 0)}
    from neurovfm.eval.metrics import auroc
    r = {"setup": {"seed": seed, "epochs": 100, "aux_weight": 1.0, "grid": list(grid), "train_fraction": 1.0,
                   "training_labels": {"CT": ["a", "b"], "MR": ["a", "b"]}},
         "scores": {"labels": ["a", "b"], "test": test, "val": {}}}
    for m in ("CT", "MR"):
        ks = [k for k in test if test[k]["modality"] == m]
        yy, ss = np.array([test[k]["y"] for k in ks]), np.array([test[k]["score"] for k in ks])
        per = {h: auroc(yy[:, j], ss[:, j]) for j, h in enumerate("ab")}
        r[m] = {"macro": float(np.mean(list(per.values()))), "auroc": per}
    r["macro"] = (r["CT"]["macro"] + r["MR"]["macro"]) / 2
    path.write_text(json.dumps({"command": f"difficulty.py --seed {seed}", "cnn_mask_aux": r}))
    return str(path), r


def test_paired_seeds_study_bootstrap_one_seed_and_a_varied_grid(tmp_path, monkeypatch, capsys):
    """Files that keep their per-study scores are compared on the same patient resamples, which
    needs only one seed: the estimate is A's macro AUROC minus B's, a clearly stronger A has an
    interval above zero, and no t interval is claimed from one seed. Runs on different grids are
    refused unless --vary grid names the compared setting; runs that scored other studies are refused."""
    ps = _load("paired_seeds")
    fa, ra = _scored_result(tmp_path / "fine.json", 0, 2.0, grid=(40, 108, 90))
    fb, rb = _scored_result(tmp_path / "coarse.json", 0, 0.5)
    out = tmp_path / "rec.json"
    base = ["paired_seeds.py", "--a", fa, "--b", fb, "--names", "2mm,3mm", "--out", str(out)]
    monkeypatch.setattr("sys.argv", base)
    assert ps.main() == 2 and "differ in 'grid'" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr("sys.argv", base + ["--vary", "grid"])
    assert ps.main() == 0
    rec = json.loads(out.read_text())
    assert rec["difference_t95"] is None and rec["varied"] == "grid"
    for m in ("CT", "MR"):
        sb = rec["study_bootstrap"][m]
        assert sb["estimate"] == pytest.approx(ra[m]["macro"] - rb[m]["macro"])
        assert 0 < sb["low"] < sb["estimate"] < sb["high"] and sb["patients"] == 60 and sb["test_studies"] == 120
    for extra, why in ((["--vary", "colour"], "not a compared setting"),):
        monkeypatch.setattr("sys.argv", base + extra)
        assert ps.main() == 2 and why in capsys.readouterr().err
    # anti-aliasing is a compared setting too (a file without it was point-sampled): pairing runs that
    # differ in it and in the grid would credit the grid with both changes
    d = json.loads(open(fa).read())
    d["cnn_mask_aux"]["setup"]["antialias"] = True
    (tmp_path / "fine_aa.json").write_text(json.dumps(d))
    monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", str(tmp_path / "fine_aa.json"), "--b", fb, "--vary", "grid",
                                     "--out", str(tmp_path / "y.json")])
    assert ps.main() == 2 and "differ in 'antialias' (True vs False)" in capsys.readouterr().err
    fc, _ = _scored_result(tmp_path / "short.json", 0, 0.5, grid=(40, 108, 90), drop_study=True)
    monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", fa, "--b", fc, "--out", str(tmp_path / "x.json")])
    assert ps.main() == 2 and "short.json scored other CT test studies" in capsys.readouterr().err


def test_score_ensemble_is_the_mean_logit_and_checks_its_members(tmp_path, monkeypatch, capsys):
    """The ensemble scores each test study by its members' mean logit (recomputed here by hand);
    each member's macro is recomputed from its kept scores; files without scores, with other test
    studies, or whose scores disagree with their reported AUROC are refused by name, nothing written."""
    from neurovfm.eval.metrics import auroc

    se = _load("score_ensemble")
    f1, r1 = _scored_result(tmp_path / "s0.json", 0, 1.0)
    f2, r2 = _scored_result(tmp_path / "s1.json", 1, 1.0, grid=(40, 108, 90))
    out = tmp_path / "ens.json"
    monkeypatch.setattr("sys.argv", ["score_ensemble.py", f1, f2, "--out", str(out)])
    assert se.main() == 0
    rec = json.loads(out.read_text())
    t1, t2 = r1["scores"]["test"], r2["scores"]["test"]
    for m in ("CT", "MR"):
        ks = sorted(k for k in t1 if t1[k]["modality"] == m)
        y = np.array([t1[k]["y"] for k in ks])
        s = np.array([(np.array(t1[k]["score"]) + np.array(t2[k]["score"])) / 2 for k in ks])
        want = np.mean([auroc(y[:, j], s[:, j]) for j in range(2)])
        assert rec["ensemble"][m]["macro"] == pytest.approx(want)
        assert [mm[m] for mm in rec["members"]] == pytest.approx([r1[m]["macro"], r2[m]["macro"]])
    assert rec["ensemble"]["macro"] > rec["member_mean"]["macro"]  # independent noise averages out
    old = _difficulty_result(tmp_path / "old.json", 2, 0.8, 0.8)
    short, _ = _scored_result(tmp_path / "short.json", 3, 1.0, drop_study=True)
    tampered = json.loads(open(f1).read())
    tampered["cnn_mask_aux"]["macro"] += 0.01
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    short_scores = json.loads(open(f2).read())
    next(iter(short_scores["cnn_mask_aux"]["scores"]["test"].values()))["score"].pop()
    (tmp_path / "cut.json").write_text(json.dumps(short_scores))
    for files, why in (([f1, old], "old.json: keeps no per-study test scores"),
                       ([f1, str(tmp_path / "cut.json")], "cut.json: study s0's kept scores do not match the 2 labels"),
                       ([f1, short], "short.json: scored other test studies"),
                       ([f1, str(tmp_path / "tampered.json")], "tampered.json: its kept scores give"),
                       ([f1], "at least two result files")):
        out2 = tmp_path / "none.json"
        monkeypatch.setattr("sys.argv", ["score_ensemble.py", *files, "--out", str(out2)])
        assert se.main() == 2
        assert why in capsys.readouterr().err and not out2.exists()


def test_by_attribute_splits_a_label_by_grade_and_refuses_other_archives(tmp_path, monkeypatch, capsys):
    """Each grade's positives are scored against all of the modality's negatives (checked against a
    hand computation): a grade the scores separate gets a high AUROC, one they miss sits near 0.5;
    the all-positives AUROC must match the file's; studies of another archive or secret are refused
    by name, and nothing is written."""
    from neurovfm.eval.metrics import auroc
    from neurovfm.privacy.keys import Keyer

    ba = _load("by_attribute")
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "test-secret")
    keyer = Keyer.from_site()
    rng = np.random.default_rng(3)
    recs, test = [], {}
    for i in range(160):
        mod = "CT" if i % 2 else "MR"
        grade = (0, 1, 2)[i % 3]  # 0: no finding
        y = [1.0 if grade else 0.0]
        score = rng.normal() + (3.0 if grade == 2 else 0.0)  # grade 2 separated, grade 1 not
        recs.append({"study_uid": f"1.2.{i}", "findings": [{"label": "svd", "fazekas": grade}] if grade else []})
        test[keyer.study(f"1.2.{i}")] = {"modality": mod, "patient": f"p{i}", "y": y, "score": [score]}
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "findings.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    r = {"setup": {"seed": 0}, "scores": {"labels": ["svd"], "test": test, "val": {}}}
    for m in ("CT", "MR"):
        ks = [k for k in test if test[k]["modality"] == m]
        r[m] = {"macro": 0.0, "auroc": {"svd": auroc(np.array([test[k]["y"][0] for k in ks]),
                                                     np.array([test[k]["score"][0] for k in ks]))}}
    r["macro"] = 0.0
    res_file = tmp_path / "r.json"
    res_file.write_text(json.dumps({"command": "difficulty.py", "cnn_mask_aux": r}))
    out = tmp_path / "rec.json"
    argv = ["by_attribute.py", str(archive), str(res_file), "--label", "svd", "--attribute", "fazekas"]
    monkeypatch.setattr("sys.argv", argv + ["--out", str(out)])
    assert ba.main() == 0
    rec = json.loads(out.read_text())
    for m in ("CT", "MR"):
        ks = [k for k in test if test[k]["modality"] == m]
        neg = [test[k]["score"][0] for k in ks if test[k]["y"][0] == 0]
        g2 = [test[k]["score"][0] for k in ks if test[k]["y"][0] == 1 and
              next(x for x in recs if keyer.study(x["study_uid"]) == k)["findings"][0]["fazekas"] == 2]
        got = rec["per_file"]["r.json"][m]
        assert got["2"]["auroc"] == pytest.approx(auroc(np.r_[np.zeros(len(neg)), np.ones(len(g2))], np.r_[neg, g2]))
        assert got["2"]["n"] == len(g2) and got["n_negative"] == len(neg)
        assert got["2"]["auroc"] > 0.9 and 0.25 < got["1"]["auroc"] < 0.75
        assert got["all"]["auroc"] == pytest.approx(r[m]["auroc"]["svd"])
    # the wrong secret keys other studies; a label the file does not score; a file that disagrees
    r2 = json.loads(res_file.read_text())
    r2["cnn_mask_aux"]["CT"]["auroc"]["svd"] += 0.01
    (tmp_path / "bad.json").write_text(json.dumps(r2))
    for env, args, why in (("other-secret", [str(res_file)], "has no svd finding in this archive"),
                           ("test-secret", [str(res_file), "--label", "atrophy"], "scores no 'atrophy'"),
                           ("test-secret", [str(tmp_path / "bad.json")], "bad.json: its kept CT scores give")):
        monkeypatch.setenv("NEUROVFM_SITE_SECRET", env)
        out2 = tmp_path / "none.json"
        full = ["by_attribute.py", str(archive), *args[:1], "--label", "svd", "--attribute", "fazekas",
                *args[1:], "--out", str(out2)]
        monkeypatch.setattr("sys.argv", full)
        assert ba.main() == 2
        assert why in capsys.readouterr().err and not out2.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "findings.jsonl").write_text(json.dumps({"findings": [{"label": "svd", "fazekas": 1}]}) + "\n")
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "test-secret")
    monkeypatch.setattr("sys.argv", ["by_attribute.py", str(broken), str(res_file), "--label", "svd",
                                     "--attribute", "fazekas", "--out", str(tmp_path / "none.json")])
    assert ba.main() == 2
    assert "record 1 is not a `neurovfm synth` finding record" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_mask_supervised_run_keeps_the_voxel_heads_maxima(difficulty, tmp_path):
    """With masks the kept per-study scores also hold the voxel head's maxima, one per AUX class in
    the named order, and they are the scores the reported voxel-head AUROCs come from."""
    from neurovfm.eval.metrics import auroc

    labels, studies, path = _cnn_world(tmp_path, difficulty)
    r = difficulty.run_cnn(None, studies, labels, epochs=1, batch=3, inputs_file=path, threads=1, aux_weight=1.0)
    sc = r["scores"]
    assert sc["voxel_labels"] == list(difficulty.AUX)
    checked = 0
    for mod in ("CT", "MR"):
        ks = [k for k in sc["test"] if labels[k]["modality"] == mod]
        for j, h in enumerate(difficulty.AUX):
            assert all(len(sc["test"][k]["voxel_max"]) == len(difficulty.AUX) for k in ks)
            yv = np.array([labels[k]["y"][difficulty.HEADLINE.index(h)] for k in ks])
            if 0 < yv.sum() < len(yv):
                got = auroc(yv, np.array([sc["test"][k]["voxel_max"][j] for k in ks]))
                assert r["voxel_head_max"][mod]["auroc"][h] == pytest.approx(got)
                checked += 1
    assert checked >= 3 and all("voxel_max" in v for v in sc["val"].values())
    plain = difficulty.run_cnn(None, studies, labels, epochs=1, batch=3, inputs_file=path, threads=1)
    assert "voxel_labels" not in plain["scores"] and not any("voxel_max" in v for v in plain["scores"]["test"].values())


def _fusion_file(path, macro_ct=None):
    """A difficulty.py-shaped result keeping head scores and voxel maxima: labels a (with a voxel
    class) and b (without); 6 validation and 6 test studies per modality, one patient each."""
    rng = np.random.default_rng(1)
    sc = {"labels": ["a", "b"], "voxel_labels": ["a"], "val": {}, "test": {}}
    for split in ("val", "test"):
        for mod in ("CT", "MR"):
            for i in range(6):
                y = [float(i % 2), float(i // 3)]
                sc[split][f"{split}{mod}{i}"] = {"modality": mod, "patient": f"p{split}{mod}{i}", "y": y,
                                                 "score": [float(x) for x in rng.normal(size=2)],
                                                 "voxel_max": [float(y[0] * 2 + rng.normal(0, 0.3))]}
    r = {"scores": sc, "setup": {}}
    for mod in ("CT", "MR"):
        ks = sorted(k for k, v in sc["test"].items() if v["modality"] == mod)
        per = {h: auroc(np.array([sc["test"][k]["y"][j] for k in ks]), np.array([sc["test"][k]["score"][j] for k in ks]))
               for j, h in enumerate(("a", "b"))}
        r[mod] = {"macro": float(np.mean(list(per.values()))) if macro_ct is None or mod == "MR" else macro_ct, "auroc": per}
    r["macro"] = (r["CT"]["macro"] + r["MR"]["macro"]) / 2
    path.write_text(json.dumps({"command": "difficulty.py --seed 0", "cnn_mask_aux": r}))
    return str(path), sc


def test_fusion_standardises_on_validation_and_leaves_labels_without_voxels(tmp_path):
    """The fused score of a label with a voxel class is the mean of the head's and the voxel
    maximum's scores, each standardised by the validation split's mean and SD of its modality; a
    label without one keeps the head's score; a voxel maximum that carries the label lifts AUROC."""
    fv = _load("fuse_voxel")
    path, sc = _fusion_file(tmp_path / "r.json")
    res = fv.run([path], "cnn_mask_aux")
    fz = fv.fuse_one(fv.load(path, "cnn_mask_aux"))
    for mod in ("CT", "MR"):
        val = [v for v in sc["val"].values() if v["modality"] == mod]
        h = np.array([v["score"][0] for v in val])
        x = np.array([v["voxel_max"][0] for v in val])
        k = fz[mod]["keys"][2]
        t = sc["test"][k]
        expect = ((t["score"][0] - h.mean()) / h.std() + (t["voxel_max"][0] - x.mean()) / x.std()) / 2
        assert fz[mod]["fused"][2, 0] == pytest.approx(expect)
        np.testing.assert_array_equal(fz[mod]["fused"][:, 1], fz[mod]["head"][:, 1])
        got = res["files"][0]
        assert got["fused"][mod]["auroc"]["a"] > got["head"][mod]["auroc"]["a"] + 0.2  # the voxel maximum carries a
        assert got["fused"][mod]["auroc"]["b"] == got["head"][mod]["auroc"]["b"]
        assert res["files"][0]["head"][mod]["macro"] == pytest.approx(json.loads((tmp_path / "r.json").read_text())
                                                                      ["cnn_mask_aux"][mod]["macro"])


def test_fusion_refuses_files_without_voxel_maxima_or_with_other_scores(tmp_path, monkeypatch, capsys):
    fv = _load("fuse_voxel")
    path, sc = _fusion_file(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    for v in d["cnn_mask_aux"]["scores"]["test"].values():
        v.pop("voxel_max")
    (tmp_path / "old.json").write_text(json.dumps(d))
    bad, _ = _fusion_file(tmp_path / "bad.json", macro_ct=0.99)
    out = tmp_path / "rec.json"
    for f, why in ((tmp_path / "old.json", "old.json: keeps no voxel-head maxima"), (bad, "bad.json: its kept CT scores")):
        monkeypatch.setattr("sys.argv", ["fuse_voxel.py", str(f), "--out", str(out)])
        assert fv.main() == 2
        assert why in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr("sys.argv", ["fuse_voxel.py", path, path, "--out", str(out)])
    assert fv.main() == 0
    rec = json.loads(out.read_text())
    assert rec["ensemble"]["fused"]["macro"] == pytest.approx(rec["files"][0]["fused"]["macro"])
    for kind in ("head", "fused", "fitted"):  # the ensemble's macros, with patient-bootstrap intervals
        iv = rec["intervals"][kind]
        for part, want in (("CT", rec["ensemble"][kind]["CT"]["macro"]), ("MR", rec["ensemble"][kind]["MR"]["macro"]),
                           ("mean", rec["ensemble"][kind]["macro"])):
            assert iv[part]["estimate"] == pytest.approx(want) and iv[part]["low"] <= want <= iv[part]["high"]
    assert rec["paired_bootstrap"]["fused_minus_head"]["CT"]["estimate"] > 0


def test_paired_seeds_compares_the_seg_to_head_setting(tmp_path, monkeypatch, capsys):
    """A study head that reads the voxel peaks is another setting: paired against a file made before
    the option existed (read as off) it is refused unless --vary seg_to_head names it."""
    ps = _load("paired_seeds")
    on = []
    for s in (0, 1):
        p = _difficulty_result(tmp_path / f"on{s}.json", s, 0.8, 0.8)
        d = json.loads(open(p).read())
        d["cnn_mask_aux"]["setup"]["seg_to_head"] = True
        open(p, "w").write(json.dumps(d))
        on.append(p)
    old = [_difficulty_result(tmp_path / f"old{s}.json", s, 0.8, 0.8) for s in (0, 1)]
    out = tmp_path / "rec.json"
    monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", *on, "--b", *old, "--out", str(out)])
    assert ps.main() == 2
    assert "differ in 'seg_to_head' (True vs False)" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr("sys.argv", ["paired_seeds.py", "--a", *on, "--b", *old, "--vary", "seg_to_head", "--out", str(out)])
    assert ps.main() == 0 and json.loads(out.read_text())["varied"] == "seg_to_head"
