"""bench/explain/jepa_surprise.py: the label-free map from Vol-JEPA's own prediction error."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurovfm.models.config import EncoderConfig, PredictorConfig
from neurovfm.models.encoder import Encoder
from neurovfm.models.packing import Packed
from neurovfm.pretrain.jepa import JEPA
from neurovfm.pretrain.masks import MaskConfig, make_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("jepa_surprise", os.path.join(ROOT, "bench", "explain",
                                                                                 "jepa_surprise.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grid(n: int = 6) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(3), np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 3)


def _models(seed: int):
    torch.manual_seed(seed)
    enc = EncoderConfig(width=48, depth=2, heads=4, token_dim=1024)
    model = JEPA(enc, PredictorConfig(width=48, depth=1, heads=4)).eval()
    teacher = Encoder(enc).eval()
    teacher.load_state_dict(model.student.state_dict())
    return model, teacher


def test_surprise_is_the_mean_error_over_the_rounds_that_masked_each_token():
    sp = _script()
    model, teacher = _models(0)
    coords = _grid()
    tok = torch.randn(len(coords), 1024)
    cfg = MaskConfig()
    got = sp.surprise(model, teacher, tok, coords, "MR", cfg, rounds=3, key="s1", seed=0)
    # by hand: the same seeded masks, one error per (round, target token)
    ct = torch.from_numpy(coords)
    with torch.no_grad():
        h = teacher(Packed(tok, ct, [0, len(coords)]))
        target = F.layer_norm(h, (h.shape[-1],))
        errs = [[] for _ in coords]
        for r in range(3):
            c, t = make_mask(coords, "MR", cfg, sp.series_seed(0, "s1", r))
            z = model.student(Packed(tok[c], ct[c], [0, len(c)]))
            pred = model.predictor(z, ct[c], [0, len(c)], ct[t], [0, len(t)])
            for i, e in zip(t, F.smooth_l1_loss(pred, target[t], reduction="none").mean(-1)):
                errs[i].append(float(e))
    want = np.array([np.mean(e) if e else np.nan for e in errs])
    seen = ~np.isnan(want)
    assert seen.any() and not seen.all()  # some tokens were never a target: they get the median
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5)
    np.testing.assert_allclose(got[~seen], np.median(want[seen]), rtol=1e-5)
    again = sp.surprise(model, teacher, tok, coords, "MR", cfg, rounds=3, key="s1", seed=0)
    np.testing.assert_array_equal(got, again)  # seeded per series
    other = sp.surprise(model, teacher, tok, coords, "MR", cfg, rounds=3, key="s2", seed=0)
    assert not np.array_equal(got, other)


def test_intensity_outlier_and_cli_errors(tmp_path, capsys, monkeypatch):
    """Every refusal is one line naming the input, exit 2, and nothing is written."""
    import json

    from neurovfm.tokens.cache import TokenCache
    from neurovfm.ingest.policy import PreprocessPolicy

    sp = _script()
    u8 = np.full((10, 8), 100, np.uint8)
    u8[3] = 200
    assert int(np.argmax(sp.intensity_outlier(u8))) == 3
    out = str(tmp_path / "o.json")
    base = ["--run", str(tmp_path), "--cache", str(tmp_path), "--out", out]
    assert sp.main(base + ["--archive", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    for bad in (["--rounds", "0"], ["--modalities", "CT,PET"], ["--bootstrap", "10"]):
        with pytest.raises(SystemExit) as e:
            sp.main(base + ["--archive", str(tmp_path)] + bad)
        assert e.value.code == 2
    # an archive whose study is not in the cache (as with another site secret): refused before any model
    monkeypatch.setenv("NEUROVFM_SITE_SECRET", "test-secret")
    arch = tmp_path / "archive"
    os.makedirs(arch / "masks")
    (arch / "masks" / "s.nii.gz").write_bytes(b"")
    (arch / "records.jsonl").write_text(json.dumps({
        "study_uid": "1.2", "patient_id": "P", "split": "test", "modality": "MR",
        "findings": [{"label": "glioma", "size_mm": 20.0}],
        "series": [{"series_uid": "1.2.3", "mask": "masks/s.nii.gz"}]}) + "\n")
    cache = str(tmp_path / "cache")
    TokenCache(cache, PreprocessPolicy(), create=True)
    assert sp.main(["--run", str(tmp_path / "no_run"), "--archive", str(arch), "--cache", cache, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "is in " + cache in err and "NEUROVFM_SITE_SECRET" in err
    assert sp.main(["--run", str(tmp_path / "no_run"), "--archive", str(arch), "--cache", cache, "--out", out,
                    "--ct-view", "lung"]) == 2
    assert "CT windows are" in capsys.readouterr().err
    for run in (tmp_path, tmp_path / "not_a_checkpoint"):  # no checkpoint there: named, exit 2
        os.makedirs(run, exist_ok=True)
        with pytest.raises(sp.SurpriseInputError, match="checkpoint"):
            sp.load_run(str(run))
    assert not os.path.exists(out)


def test_pair_compares_the_same_studies_and_refuses_others(tmp_path, capsys):
    import json

    sp = _script()
    rows = [{"modality": "MR", "patient": f"p{i}", "uniform": 0.1 * (i + 1), "hit_surprise": float(i < 3)}
            for i in range(6)]
    a, b, c = (str(tmp_path / f"{n}.json") for n in "abc")
    with open(a, "w") as fh:
        json.dump({"studies": rows}, fh)
    with open(b, "w") as fh:
        json.dump({"studies": [{**r, "hit_surprise": float(i == 0)} for i, r in enumerate(rows)]}, fh)
    with open(c, "w") as fh:
        json.dump({"studies": [{**r, "uniform": 0.5} for r in rows]}, fh)
    res = sp.paired(a, b, n=200)["MR"]
    assert res["studies"] == 6 and res["a"] == 0.5 and res["b"] == pytest.approx(1 / 6)
    assert res["a_minus_b"] == pytest.approx(1 / 3) and res["ci95"][0] <= 1 / 3 <= res["ci95"][1]
    with pytest.raises(sp.SurpriseInputError, match="different studies"):
        sp.paired(a, c)
    assert sp.main(["--pair", a]) == 2
    assert sp.main(["--pair", a, str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not an output of this script" in capsys.readouterr().err
