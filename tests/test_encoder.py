"""The packed 3D ViT: packing is exact, backends agree, position codes are the reference's,
the base size holds the reference checkpoint's parameters, and model folders round-trip."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neurovfm.models.attention import AttentionBackendError, resolve_backend
from neurovfm.models.config import SIZES, EncoderConfig, encoder_config
from neurovfm.models.encoder import Encoder
from neurovfm.models.folder import ModelFolderError, load_encoder, make_provenance, read_config, save_encoder
from neurovfm.models.packing import Packed, pad
from neurovfm.models.position import sincos_3d

CPU_BACKENDS = ["loop", "mask", "nested", "flex"]


def small_cfg(**kw) -> EncoderConfig:
    base = dict(width=96, depth=2, heads=4, token_dim=64)
    base.update(kw)
    return EncoderConfig(**base)


def random_batch(lengths, token_dim=64, seed=0, span=20) -> Packed:
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(n, token_dim, generator=g), torch.randint(0, span, (n, 3), generator=g)) for n in lengths]
    return Packed.cat(parts)


def encoder(cfg: EncoderConfig, seed=0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(cfg).eval()


@pytest.mark.parametrize("pos_code", ["sincos_concat", "rope3d"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_padded(pos_code, seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(1, 60, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
    b = random_batch(lengths, seed=seed)
    enc = encoder(small_cfg(pos_code=pos_code), seed)
    with torch.no_grad():
        packed = enc(b)
        t, valid = pad(b.tokens, b.cu)
        c, _ = pad(b.coords, b.cu)
        padded = enc.forward_padded(t, c, valid)[valid]
    assert packed.shape == (sum(lengths), 96)
    assert torch.allclose(packed, padded, atol=1e-5, rtol=0), (packed - padded).abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pos_code", ["sincos_concat", "rope3d"])
def test_backends_agree(backend, pos_code):
    b = random_batch([7, 33, 33, 33, 1, 50], seed=3)
    enc = encoder(small_cfg(pos_code=pos_code, attention="loop"))
    ref = enc(b).detach()
    enc.cfg = dataclasses.replace(enc.cfg, attention=backend)
    for blk in [enc]:
        blk.cfg = enc.cfg
    with torch.no_grad():
        out = enc(b)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_attention_stays_within_a_series():
    """A series' features do not change when other series are packed beside it."""
    b = random_batch([12, 40, 25], seed=5)
    enc = encoder(small_cfg())
    with torch.no_grad():
        together = b.split(enc(b))
        for i in range(3):
            s, e = b.cu[i], b.cu[i + 1]
            alone = enc(Packed(b.tokens[s:e], b.coords[s:e], [0, e - s]))
            assert torch.allclose(alone, together[i], atol=1e-5, rtol=0)


def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "loop"
    for name in ("varlen", "flash"):
        with pytest.raises(AttentionBackendError, match="CUDA"):
            resolve_backend(name, cpu)


def test_position_code_equals_positional_encodings_package():
    from positional_encodings.torch_encodings import PositionalEncoding3D

    g = torch.Generator().manual_seed(0)
    D, H, W = 9, 17, 13
    ref = PositionalEncoding3D(30)(torch.zeros(1, D, H, W, 30))[0]  # [D, H, W, 30]
    coords = torch.stack([torch.randint(0, s, (500,), generator=g) for s in (D, H, W)], dim=1)
    ours = sincos_3d(coords, 30)
    expect = ref[coords[:, 0], coords[:, 1], coords[:, 2]]
    assert torch.allclose(ours, expect, atol=1e-6)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize("span", [20, 5000])
def test_no_allocation_beyond_tokens_times_width(span):
    """The code is computed from coordinates: nothing scales with the grid (huge coordinates
    allocate no more), and no op output exceeds the MLP's hidden activation of N x 4C."""
    cfg = small_cfg()
    b = random_batch([40, 60], seed=1, span=span)
    enc = encoder(cfg)
    mode = _MaxNumel()
    with torch.no_grad(), mode:
        enc(b)
    n = b.tokens.shape[0]
    assert mode.max <= n * int(cfg.width * cfg.mlp_ratio)


def test_rope_depends_on_relative_position_only():
    b = random_batch([30, 20], seed=2)
    shifted = Packed(b.tokens, b.coords + torch.tensor([3, -5, 11]), b.cu)
    with torch.no_grad():
        rope = encoder(small_cfg(pos_code="rope3d"))
        assert torch.allclose(rope(b), rope(shifted), atol=1e-4)
        absolute = encoder(small_cfg())
        assert not torch.allclose(absolute(b), absolute(shifted), atol=1e-3)


def test_attention_weights_mode():
    b = random_batch([10, 25], seed=4)
    enc = encoder(small_cfg())
    with torch.no_grad():
        out, weights = enc(b, attention_layers=[0, -1])
        plain = enc(b)
    assert torch.allclose(out, plain, atol=1e-6)
    assert len(weights) == 2 and [w.shape for w in weights[1]] == [(4, 10, 10), (4, 25, 25)]
    for per_layer in weights:
        for w in per_layer:
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)


def _spec_state_shapes() -> dict[str, tuple[int, ...]]:
    """SPEC.md section 5, written out independently of the model code."""
    s = {"token_embed.proj.weight": (738, 1024), "token_embed.proj.bias": (738,),
         "norm.weight": (768,), "norm.bias": (768,)}
    for i in range(12):
        p = f"blocks.{i}."
        s.update({p + "norm1.weight": (768,), p + "norm1.bias": (768,),
                  p + "mixer.qkv.weight": (2304, 768), p + "mixer.qkv.bias": (2304,),
                  p + "mixer.proj.weight": (768, 768),
                  p + "norm2.weight": (768,), p + "norm2.bias": (768,),
                  p + "mlp.fc1.weight": (3072, 768), p + "mlp.fc1.bias": (3072,),
                  p + "mlp.fc2.weight": (768, 3072), p + "mlp.fc2.bias": (768,)})
    return s


def test_base_holds_reference_checkpoint_parameters_exactly():
    with torch.device("meta"):
        enc = Encoder(encoder_config("base"))
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == _spec_state_shapes()
    assert all(isinstance(m, torch.nn.LayerNorm) and m.eps == 1e-6
               for n, m in enc.named_modules() if "norm" in n.split(".")[-1])


@pytest.mark.parametrize("size,params_m", [("tiny", (5, 7)), ("small", (21, 23)), ("base", (85, 87)),
                                           ("large", (303, 306))])
def test_named_sizes(size, params_m):
    with torch.device("meta"):
        enc = Encoder(encoder_config(size))
    n = sum(p.numel() for p in enc.parameters()) / 1e6
    assert params_m[0] <= n <= params_m[1], n
    assert enc.cfg.width == SIZES[size]["width"]


@pytest.mark.parametrize("bad", [dict(width=100, heads=3), dict(pos_code="learned"), dict(attention="xformers"),
                                 dict(pos_dim=31)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        small_cfg(**bad)


def test_model_folder_round_trip(tmp_path):
    enc = encoder(small_cfg(pos_code="rope3d"))
    folder = str(tmp_path / "model")
    save_encoder(enc, folder, make_provenance(data={"cache_schema_hash": "abc"}, command=["test"]))
    assert sorted(os.listdir(folder)) == ["config.json", "encoder.safetensors", "provenance.json"]
    cfg = read_config(folder)
    assert cfg["format"] == "neurovfm-model" and cfg["encoder"]["pos_code"] == "rope3d"
    with open(os.path.join(folder, "provenance.json")) as fh:
        prov = json.load(fh)
    assert prov["data"]["cache_schema_hash"] == "abc" and prov["code"]["package"]
    back = load_encoder(folder, attention="mask")
    b = random_batch([9, 14])
    with torch.no_grad():
        assert torch.allclose(enc(b), back(b), atol=1e-6)


def test_model_folder_refuses_bad_input(tmp_path):
    folder = str(tmp_path / "m")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_encoder(folder)
    save_encoder(encoder(small_cfg()), folder)
    with open(os.path.join(folder, "encoder.safetensors"), "r+b") as fh:
        fh.write(b"\xff" * 16)
    with pytest.raises(ModelFolderError, match="encoder.safetensors"):
        load_encoder(folder)
    save_encoder(encoder(small_cfg()), folder)
    cfg = read_config(folder)
    cfg["encoder"]["width"] = 128
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ModelFolderError, match="do not fit"):
        load_encoder(folder)
    with pytest.raises(ModelFolderError, match="overridden"):
        load_encoder(folder, width=96)
