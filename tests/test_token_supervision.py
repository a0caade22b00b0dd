"""The token term of head training (lesion masks of training studies): the loss is what its
docstring says, packed targets follow the tokens that were packed, which (study, class) pairs it
may use, and a held-out experiment: where a study label can be read off a global shift, heads
trained on labels alone point anywhere, heads given masks of part of the training studies point
at the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurovfm.eval.metrics import auroc
from neurovfm.probe.heads import HeadConfig, build_head, token_logits
from neurovfm.probe.train import (HeadTrainConfig, _pack, _pack_targets, fit_head, predict, token_loss,
                                   trusted_pairs)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _batch(rng, dim=6, n=(7, 5), c=2):
    x = torch.tensor(rng.normal(size=(sum(n), dim)), dtype=torch.float32)
    cu = torch.tensor([0, n[0], sum(n)])
    lesion = torch.zeros((sum(n), c), dtype=torch.bool)
    lesion[[1, 2], 0] = True  # study 0: two lesion tokens of class 0
    lesion[[9], 1] = True  # study 1: one of class 1
    return x, cu, lesion


@pytest.mark.parametrize("balance", ["pooled", "per_class"])
@pytest.mark.parametrize("kind", ["gated", "abmil", "topk", "mean"])
def test_token_loss_is_the_documented_sum(kind, balance):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, cu, lesion = _batch(rng)
    head = build_head(HeadConfig(kind=kind, dropout=0.0), 6, 2)
    head.eval()
    trusted = torch.tensor([[True, False], [True, True]])  # study 0 class 1 not usable
    _, attn = head(x, cu)
    got = token_loss(head, x, cu, attn, lesion, trusted, balance)
    seg = torch.tensor([0] * 7 + [1] * 5)
    ok = trusted[seg]
    les = lesion & ok
    want = torch.zeros(())
    tl = token_logits(head, x)
    if tl is not None:  # balanced BCE by hand, element by element
        pos = [[F.binary_cross_entropy_with_logits(tl[t, k], torch.tensor(1.0)) for t in range(12) if les[t, k]]
               for k in range(2)]
        neg = [[F.binary_cross_entropy_with_logits(tl[t, k], torch.tensor(0.0))
                for t in range(12) if ok[t, k] and not les[t, k]] for k in range(2)]
        assert [len(p) for p in pos] == [2, 1] and [len(n) for n in neg] == [12 - 2, 5 - 1]
        if balance == "pooled":  # one mean over every class's tokens
            want = want + 0.5 * torch.stack(pos[0] + pos[1]).mean() + 0.5 * torch.stack(neg[0] + neg[1]).mean()
        else:  # the mean of each class's own mean
            want = want + 0.25 * (torch.stack(pos[0]).mean() + torch.stack(pos[1]).mean()) \
                + 0.25 * (torch.stack(neg[0]).mean() + torch.stack(neg[1]).mean())
    if kind in ("gated", "abmil"):  # learned attention: -log of its mass on the lesion, per pair
        pairs = [-torch.log(attn[1:3, 0].sum() + 1e-6), -torch.log(attn[9, 1] + 1e-6)]
        want = want + torch.stack(pairs).mean()
    else:
        assert not attn.requires_grad
    assert torch.allclose(got, want, atol=1e-6), (kind, float(got), float(want))
    if kind == "mean":
        assert float(got) == 0.0  # nothing a token target can shape


@pytest.mark.parametrize("kind", ["gated", "abmil", "topk", "mean"])
def test_token_logits_of_an_ensemble_are_the_members_mean(kind):
    torch.manual_seed(0)
    ens = build_head(HeadConfig(kind=kind, ensemble=3), 8, 2).eval()
    x = torch.randn(30, 8)
    got = token_logits(ens, x)
    if kind == "mean":
        assert got is None
        return
    per = [token_logits(m, x) for m in ens.members]
    assert not torch.allclose(per[0], per[1])
    torch.testing.assert_close(got, torch.stack(per).mean(0))


def test_token_loss_counts_only_trusted_pairs():
    torch.manual_seed(0)
    x, cu, lesion = _batch(np.random.default_rng(1))
    head = build_head(HeadConfig(kind="gated", dropout=0.0), 6, 2)
    head.eval()
    _, attn = head(x, cu)
    none = torch.zeros((2, 2), dtype=torch.bool)
    assert float(token_loss(head, x, cu, attn, lesion, none)) == 0.0
    only0 = torch.tensor([[True, False], [False, False]])
    l0 = token_loss(head, x, cu, attn, lesion, only0)
    # changing study 1's tokens or targets cannot change a loss that does not use study 1
    x2, les2 = x.clone(), lesion.clone()
    x2[7:] += 5.0
    les2[7:] = True
    _, attn2 = head(x2, cu)
    assert torch.allclose(l0, token_loss(head, x2, cu, attn2, les2, only0))


def test_trusted_pairs_rule():
    y = np.array([[1, 0, np.nan], [1, 0, 0], [1, 1, 0]], np.float32)
    t_hit = np.zeros((4, 3), bool)
    t_hit[0, 0] = True  # class 0 has a lesion token
    targets = [t_hit, np.zeros((4, 3), bool), None]
    got = trusted_pairs(targets, y)
    want = np.array([[True, True, False],  # NaN label: not usable
                     [False, True, True],  # positive without lesion tokens: not usable
                     [False, False, False]])  # no masks
    assert (got == want).all()
    with pytest.raises(ValueError, match="classes"):
        trusted_pairs([np.zeros((4, 2), bool)], y[:1])


def test_packed_targets_follow_the_sampled_tokens():
    rng = np.random.default_rng(3)
    bags, targets = [], []
    for n in (50, 9, 70):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        x[:, 0] = np.arange(n)  # each token carries its row number
        bags.append(x)
        targets.append(np.stack([np.arange(n) % 7 == 0, np.arange(n) % 3 == 1], 1))
    targets[1] = None
    g = torch.Generator().manual_seed(0)
    rows: list = []
    x, cu = _pack(bags, [2, 1, 0], 20, g, rows)
    les = _pack_targets(targets, [2, 1, 0], rows, cu, 2)
    assert les.shape == (len(x), 2) and len(x) == 20 + 9 + 20
    assert rows[1] is None  # a study under max_tokens keeps all tokens
    row = x[:, 0].round().long()
    has = torch.cat([torch.ones(20), torch.zeros(9), torch.ones(20)]).bool()
    assert torch.equal(les[has, 0], (row[has] % 7 == 0)) and torch.equal(les[has, 1], (row[has] % 3 == 1))
    assert not les[~has].any()


def _confounded_bags(rng, n, dim, u, v, with_masks):
    """Positive studies: 3 lesion tokens shifted along u, and every token shifted along v (a
    global change that gives the label away without saying where the finding is)."""
    bags, y, where, targets = [], [], [], []
    for i in range(n):
        m = int(rng.integers(40, 80))
        x = rng.normal(size=(m, dim)).astype(np.float32)
        pos = rng.random() < 0.5
        idx = rng.choice(m, 3, replace=False)
        if pos:
            x[idx] += 3.0 * u
            x += 1.0 * v
        bags.append(x)
        y.append([float(pos)])
        where.append(idx if pos else np.zeros(0, int))
        t = np.zeros((m, 1), bool)
        if pos:
            t[idx, 0] = True
        targets.append(t if with_masks(i) else None)
    return bags, np.array(y, np.float32), where, targets


def test_masks_of_some_training_studies_make_the_map_point_at_held_out_lesions():
    rng = np.random.default_rng(5)
    dim = 16
    u, v = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T.astype(np.float32)
    tr, ytr, _, ttr = _confounded_bags(rng, 120, dim, u, v, lambda i: i % 2 == 0)  # masks for half
    va, yva, _, _ = _confounded_bags(rng, 40, dim, u, v, lambda i: False)
    te, yte, where, _ = _confounded_bags(rng, 80, dim, u, v, lambda i: False)
    cfg = HeadTrainConfig(epochs=20, seed=0, lr=3e-3)
    hc = HeadConfig(kind="gated", dropout=0.0)
    rates = {}
    for name, targets in (("labels", None), ("masks", ttr)):
        head, _ = fit_head(tr, ytr, va, yva, cfg, hc, token_targets=targets)
        logits, attn = predict(head, te)
        assert auroc(yte[:, 0], logits[:, 0]) > 0.95  # both read the label (the global shift is easy)
        rates[name] = np.mean([int(np.argmax(a[:, 0])) in set(w.tolist())
                               for a, w, t in zip(attn, where, yte[:, 0]) if t == 1])
    assert rates["masks"] > 0.7, rates
    assert rates["masks"] > rates["labels"] + 0.3, rates


def test_token_targets_must_match_the_bags():
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(10, 4)).astype(np.float32) for _ in range(4)]
    y = np.array([[1], [0], [1], [0]], np.float32)
    with pytest.raises(ValueError, match="differ in length"):
        fit_head(bags, y, bags, y, HeadTrainConfig(epochs=1), HeadConfig(), token_targets=[None])
    with pytest.raises(ValueError, match="9 rows"):
        fit_head(bags, y, bags, y, HeadTrainConfig(epochs=1), HeadConfig(),
                 token_targets=[np.zeros((9, 1), bool), None, None, None])
    with pytest.raises(ValueError, match="token_weight"):
        HeadTrainConfig(token_weight=-1.0)


# -- bench/explain/pointing_paired.py: two pointing games on the same findings --------------------------
def _pointing_script():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("pointing_paired",
                                                  os.path.join(root, "bench", "explain", "pointing_paired.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pointing_file(hits, mass, patients, sources=("head", "contribution")):
    rows = [{"patient": p, "modality": "CT", "label": "x", "size_mm": 12.0, "side": "left", "uniform_hit": 0.05,
             **{f"hit_{s}": bool(h) for s in sources}, **{f"mass_inside_{s}": m for s in sources}}
            for h, m, p in zip(hits, mass, patients)]
    return {"config": {"map_sources": list(sources)}, "findings": rows}


def test_pointing_pairs_the_same_findings_and_resamples_patients(tmp_path, capsys):
    import json

    mod = _pointing_script()
    rng = np.random.default_rng(0)
    pats = [f"p{i // 3}" for i in range(60)]
    ha, hb = rng.random(60) < 0.2, rng.random(60) < 0.7
    a = _pointing_file(ha, np.full(60, 0.1), pats)
    b = _pointing_file(hb, np.full(60, 0.4), pats, sources=("head",))
    res = mod.paired(a, b, bootstrap=500, seed=0)
    assert set(res["sources"]) == {"head"} and res["n_patients"] == 20
    h = res["sources"]["head"]["hit"]
    assert h["a"] == pytest.approx(ha.mean()) and h["b"] == pytest.approx(hb.mean())
    assert h["b_minus_a"] == pytest.approx(hb.mean() - ha.mean())
    assert h["ci95"][0] < h["b_minus_a"] < h["ci95"][1] and h["ci95"][0] > 0
    assert res["sources"]["head"]["mass_inside"]["b_minus_a"] == pytest.approx(0.3)
    # identical files: a zero difference with a zero-width interval
    same = mod.paired(a, a, bootstrap=200)["sources"]["contribution"]["hit"]
    assert same["b_minus_a"] == 0 and same["ci95"] == [0.0, 0.0]
    # other findings are refused, not paired row by row
    other = _pointing_file(hb, np.full(60, 0.4), pats[1:] + ["q"])
    with pytest.raises(SystemExit, match="same findings"):
        mod.paired(a, other)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert mod.main([str(pa), str(pb), "--out", str(tmp_path / "p.json"), "--bootstrap", "200"]) == 0
    assert "head: hit rate A" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["files"]["b"] == str(pb)


def test_pointing_pairs_one_modality_against_a_file_with_both():
    mod = _pointing_script()
    rng = np.random.default_rng(1)
    pats = [f"p{i // 2}" for i in range(40)]
    ha, hb = rng.random(40) < 0.3, rng.random(40) < 0.6
    a = _pointing_file(ha, np.full(40, 0.1), pats)
    for i, r in enumerate(a["findings"]):
        r["modality"] = "CT" if i % 4 < 2 else "MR"
    ct = [i for i in range(40) if i % 4 < 2]
    b = _pointing_file(hb[ct], np.full(len(ct), 0.3), [pats[i] for i in ct])
    with pytest.raises(SystemExit, match="same findings"):
        mod.paired(a, b)
    res = mod.paired(a, b, bootstrap=300, modality="CT")
    h = res["sources"]["head"]["hit"]
    assert res["n_findings"] == 20 and res["modality"] == "CT" and res["n_patients"] == 10
    assert h["a"] == pytest.approx(ha[ct].mean()) and h["b"] == pytest.approx(hb[ct].mean())
    with pytest.raises(SystemExit, match="no findings to compare for modality 'PET'"):
        mod.paired(a, b, modality="PET")


# -- bad masks folders: a named, typed error, nothing half-read -------------------------------------------
def test_bad_mask_folders_are_refused_by_file(tmp_path):
    import json

    import nibabel as nib

    from neurovfm.privacy.keys import Keyer
    from neurovfm.probe.token_targets import TokenTargetError, _read_mask, read_study_masks

    keyer = Keyer(b"k")
    with pytest.raises(TokenTargetError, match="no records.jsonl"):
        read_study_masks(str(tmp_path), keyer)
    rec = {"study_uid": "1.2", "patient_id": "P", "split": "train", "modality": "CT",
           "findings": [{"label": "acute_subdural_hematoma", "mask_index": 1}],
           "series": [{"series_uid": "1.2.3", "mask": "m.nii.gz"}]}
    (tmp_path / "records.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(TokenTargetError, match="m.nii.gz: lesion mask missing"):
        read_study_masks(str(tmp_path), keyer)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(tmp_path / "m.nii.gz"))
    got = read_study_masks(str(tmp_path), keyer)
    (sm,) = got.values()
    assert sm.lesion_labels == {1: {"acute_subdural_hematoma", "intracranial_hemorrhage"}}
    assert read_study_masks(str(tmp_path), keyer, splits=("val",)) == {}
    (tmp_path / "records.jsonl").write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(TokenTargetError, match="line 2: not a study record"):
        read_study_masks(str(tmp_path), keyer)
    bad = dict(rec, findings=[{"label": "no_such_label", "mask_index": 1}])
    (tmp_path / "records.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(TokenTargetError, match="line 1: not a study record"):
        read_study_masks(str(tmp_path), keyer)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(TokenTargetError, match="junk.nii.gz: not a readable NIfTI"):
        _read_mask(str(tmp_path / "junk.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    with pytest.raises(TokenTargetError, match="f.nii.gz: a lesion mask must be a 3-D integer volume"):
        _read_mask(str(tmp_path / "f.nii.gz"))


def test_an_unknown_token_balance_is_refused():
    with pytest.raises(ValueError, match="token_balance must be one of pooled, per_class"):
        HeadTrainConfig(token_balance="per_label")
