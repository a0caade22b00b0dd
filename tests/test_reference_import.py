"""Importing the reference encoder checkpoint (SPEC.md section 5).

The reference architecture is re-implemented here in plain torch, independently of our
Encoder, and the imported model must reproduce it on a packed batch of two series.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from positional_encodings.torch_encodings import PositionalEncoding3D

from neurovfm.cli import main as cli_main
from neurovfm.models.config import EncoderConfig
from neurovfm.models.encoder import Encoder
from neurovfm.models.folder import load_encoder, read_config, read_provenance
from neurovfm.models.packing import Packed
from neurovfm.models.position import sincos_3d
from neurovfm.models.reference import (LICENSE_NOTE, ReferenceCheckpointError, convert_reference_state,
                                       import_reference, load_reference_state, reference_encoder_config,
                                       reference_shapes, validate_reference_state)

WIDTH, HEADS, HEAD_DIM = 768, 12, 64


# ---------------------------------------------------------------- the reference, in plain torch

def random_reference_state(depth: int, seed: int = 0, zeros: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the reference's names and shapes (scales large enough that GELU's
    tanh approximation visibly matters)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in reference_shapes(depth).items():
        if zeros:
            out[name] = torch.zeros(shape)
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            out[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1]) * 1.5
    return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """flash-attn's ``gelu_approx`` (the default activation of its FusedMLP)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def reference_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor, coords: torch.Tensor,
                      cu: list[int], depth: int) -> torch.Tensor:
    """Straightforward reference ViT: linear 1024 -> 738, PositionalEncoding3D(30) looked up at the
    integer (d, h, w) and concatenated after, pre-norm blocks, attention within each series."""
    n = tokens.shape[0]
    D, H, W = (int(v) + 1 for v in coords.max(0).values)
    table = PositionalEncoding3D(30)(torch.zeros(1, D, H, W, 30))[0]
    pos = table[coords[:, 0], coords[:, 1], coords[:, 2]]
    x = torch.cat([tokens @ sd["token_embed.proj.weight"].T + sd["token_embed.proj.bias"], pos], dim=-1)

    def ln(t, name):
        return F.layer_norm(t, (WIDTH,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(depth):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        qkv = (h @ sd[b + "mixer.qkv.weight"].T + sd[b + "mixer.qkv.bias"]).reshape(n, 3, HEADS, HEAD_DIM)
        att_out = torch.zeros(n, HEADS, HEAD_DIM)
        for s, e in zip(cu, cu[1:]):
            q, k, v = qkv[s:e, 0], qkv[s:e, 1], qkv[s:e, 2]  # [L, H, d]
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
            att_out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
        x = x + att_out.reshape(n, WIDTH) @ sd[b + "mixer.proj.weight"].T  # no bias
        h = ln(x, b + "norm2")
        x = x + gelu_tanh(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]) @ sd[b + "mlp.fc2.weight"].T \
            + sd[b + "mlp.fc2.bias"]
    return ln(x, "norm")


def two_series(seed: int = 1) -> Packed:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n, grid in ((41, (7, 12, 11)), (19, (5, 9, 13))):
        cells = torch.randperm(grid[0] * grid[1] * grid[2], generator=g)[:n]
        d, rem = cells // (grid[1] * grid[2]), cells % (grid[1] * grid[2])
        coords = torch.stack([d, rem // grid[2], rem % grid[2]], dim=1)
        parts.append((torch.randn(n, 1024, generator=g), coords))
    return Packed.cat(parts)


REFERENCE_CONFIG = {
    "model": {"which": "vit_base", "params": {
        "token_dim": 1024,
        "embed_layer_cf": {"which": "voxel", "params": {"patch_hw_size": 16, "patch_d_size": 4, "in_chans": 1,
                                                         "embed_dim": 738}},
        "pos_emb_cf": {"which": "pe3d", "params": {"in_dim": 738, "d": 30, "d_size": 128, "hw_size": 192,
                                                   "pe_factor": 1, "concat": True}}}},
    "normalization_stats": [[0.3141, 0.4139, 0.3184, 0.2719], [0.2623, 0.4059, 0.3605, 0.1875]],
}


def write_reference(folder, state, config=REFERENCE_CONFIG) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pytorch_model.bin")
    torch.save(state, path)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(config, fh)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A depth-2 reference checkpoint (folder with .bin + config.json) imported once."""
    root = tmp_path_factory.mktemp("ref")
    state = random_reference_state(2)
    src = write_reference(root / "release", state)
    out = str(root / "model")
    result = import_reference(str(root / "release"), out, provenance_note="unit test")
    return state, src, out, result


# ---------------------------------------------------------------- tests

def test_position_code_is_the_package_code():
    coords = two_series().coords
    D, H, W = (int(v) + 1 for v in coords.max(0).values)
    table = PositionalEncoding3D(30)(torch.zeros(1, D, H, W, 30))[0]
    ref = table[coords[:, 0], coords[:, 1], coords[:, 2]]
    assert torch.allclose(sincos_3d(coords, 30), ref, atol=1e-6, rtol=0)


def test_full_depth_shape_table_matches_our_encoder():
    state = random_reference_state(12, zeros=True)
    assert validate_reference_state(state) == 12
    with torch.device("meta"):
        ours = Encoder(reference_encoder_config(12)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == reference_shapes(12)
    assert set(convert_reference_state(state)) == set(ours)


def test_imported_forward_matches_reference(imported):
    state, _, out, result = imported
    assert result.depth == 2 and result.folder == out
    enc = load_encoder(out).eval()
    batch = two_series()
    with torch.no_grad():
        ours = enc(batch)
        ref = reference_forward(state, batch.tokens, batch.coords, batch.cu, depth=2)
    assert ours.shape == (60, WIDTH)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4
    # exact GELU (our default) would not reproduce the reference: the imported flag matters
    exact = Encoder(EncoderConfig.from_dict({**enc.cfg.to_dict(), "mlp_act": "gelu"})).eval()
    exact.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert (exact(batch) - ref).abs().max().item() > max(3e-4, 20 * err)


def test_imported_folder_config_and_provenance(imported, tmp_path):
    _, src, out, result = imported
    cfg = read_config(out)["encoder"]
    assert cfg["pos_code"] == "sincos_concat" and cfg["pos_dim"] == 30 and cfg["norm_eps"] == 1e-6
    assert cfg["qkv_bias"] and not cfg["proj_bias"] and cfg["mlp_act"] == "gelu_tanh" and cfg["depth"] == 2
    with open(src, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    prov = read_provenance(out)
    assert result.sha256 == digest == prov["init"]["source_sha256"]
    assert prov["init"]["kind"] == "imported_reference" and prov["init"]["note"] == "unit test"
    assert prov["license"] == LICENSE_NOTE and "CC-BY-NC-SA" in prov["license"]
    assert prov["init"]["reference_config"]["model"]["which"] == "vit_base"
    # `init-model --like` copies the architecture, including the reference's tanh GELU
    like = str(tmp_path / "like")
    assert cli_main(["init-model", like, "--like", out]) == 0
    assert read_config(like)["encoder"] == read_config(out)["encoder"]
    assert isinstance(load_encoder(like), Encoder)


def test_prefixes_positional_buffers_and_safetensors_are_accepted(tmp_path):
    from safetensors.torch import save_file

    state = random_reference_state(1, zeros=True)
    wrapped = {"module." + k: v for k, v in state.items()}
    wrapped["module.pos_embed.p_enc"] = torch.zeros(10, 30)  # a (normally non-persistent) table copy
    path = str(tmp_path / "wrapped.bin")
    torch.save({"state_dict": wrapped}, path)
    loaded = load_reference_state(path)
    assert set(loaded) == set(state)
    st = str(tmp_path / "ref.safetensors")
    save_file(state, st)
    assert set(load_reference_state(st)) == set(state)


@pytest.mark.parametrize("damage, key, words", [
    ("shape", "blocks.0.mixer.qkv.weight", ["[2304, 767]", "expected [2304, 768]"]),
    ("missing", "blocks.0.norm2.bias", ["missing", "[768]"]),
    ("extra", "blocks.0.mixer.proj.bias", ["unexpected"]),
])
def test_bad_checkpoint_names_file_and_key(tmp_path, damage, key, words):
    state = random_reference_state(1, zeros=True)
    if damage == "shape":
        state[key] = torch.zeros(2304, 767)
    elif damage == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(768)
    path = write_reference(tmp_path, state, config=None)
    with pytest.raises(ReferenceCheckpointError) as e:
        import_reference(path, str(tmp_path / "out"))
    msg = str(e.value)
    assert path in msg and repr(key) in msg and all(w in msg for w in words)
    assert not os.path.exists(tmp_path / "out")


def test_config_disagreeing_with_the_import_is_refused(tmp_path):
    cfg = json.loads(json.dumps(REFERENCE_CONFIG))
    cfg["model"]["params"]["pos_emb_cf"]["params"]["pe_factor"] = 0.5
    write_reference(tmp_path, random_reference_state(1, zeros=True), config=cfg)
    with pytest.raises(ReferenceCheckpointError, match="config.json: position code"):
        import_reference(str(tmp_path), str(tmp_path / "out"))


def _touch(path):  # would run only if the pickle were executed
    open(path, "w").close()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


class _PlainObject:
    pass


@pytest.mark.parametrize("kind", ["object", "code"])
def test_pickled_objects_are_refused_without_running_them(tmp_path, kind):
    marker = str(tmp_path / "executed")
    bad = _PlainObject() if kind == "object" else _Payload(marker)
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"token_embed.proj.weight": torch.zeros(738, 1024), "extra": bad}, path)
    with pytest.raises(ReferenceCheckpointError) as e:
        load_reference_state(path)
    assert path in str(e.value) and "weights-only" in str(e.value)
    assert not os.path.exists(marker)


def test_cli_import_reference_end_to_end(tmp_path):
    src = tmp_path / "release"
    write_reference(src, random_reference_state(1, seed=3))
    out = str(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.abspath("src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "neurovfm", "import-reference", str(src), out],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    n_params = sum(p.numel() for p in load_encoder(out).parameters())
    assert out in run.stdout and str(n_params) in run.stdout and "CC-BY-NC-SA" in run.stderr

    bad = tmp_path / "bad.bin"
    torch.save({"x": _PlainObject()}, bad)
    run = subprocess.run([sys.executable, "-m", "neurovfm", "import-reference", str(bad), str(tmp_path / "m2")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurovfm import-reference: error:") and str(bad) in lines[0]
    assert "Traceback" not in run.stderr
