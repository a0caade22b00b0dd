"""Import the reference NeuroVFM encoder checkpoint into a model folder (SPEC.md section 5).

The reference ships a pickled ViT-B state dict (``pytorch_model.bin`` + ``config.json``). A
pickle can run code, so it is read only with ``torch.load(weights_only=True)`` (or from a
``.safetensors`` file). Every key and shape is checked against SPEC's table before anything is
built, so a truncated, renamed or different-sized file fails with one line naming the key.

Our ``base`` encoder uses the reference's parameter names and its position code
(``sincos_concat``, 30 dims, equal to ``PositionalEncoding3D(30)`` at the integer coordinates,
tested), so the conversion is a validated one-to-one copy; inputs use the same per-view z-score
statistics (``tokens/normalize.py``). One architectural detail differs from our default: the
reference MLP is flash-attn's ``FusedMLP`` whose default activation is the tanh approximation of
GELU, so imported models are built with ``mlp_act="gelu_tanh"``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from neurovfm.errors import NeuroVFMError
from neurovfm.files import file_sha256
from neurovfm.models.config import EncoderConfig, encoder_config
from neurovfm.models.encoder import Encoder

WIDTH, TOKEN_DIM, POS_DIM, MLP_HIDDEN = 768, 1024, 30, 3072
LICENSE_NOTE = "reference weights are CC-BY-NC-SA; check terms before use"
WEIGHTS_NAME = "pytorch_model.bin"

# DDP / wrapper prefixes some exports carry (the last three are the ones the reference loader strips)
_PREFIXES = ("module.", "encoder.", "model.", "student.vision_encoder.", "vision_encoder.")
# the positional table is a buffer recomputed from coordinates here, so any copy of it is ignored
_POSITIONAL = re.compile(r"(^|\.)(pos_embed\w*|pos_enc\w*|positional\w*|penc|cached_penc|inv_freq)(\.|$)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class ReferenceCheckpointError(NeuroVFMError):
    """The reference checkpoint is unreadable, unsafe to load, or not the expected ViT-B layout."""


@dataclass(frozen=True)
class ImportResult:
    folder: str
    n_params: int
    depth: int
    source: str
    sha256: str


def reference_shapes(depth: int = 12) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of the reference ViT-B with ``depth`` blocks (SPEC section 5)."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embed.proj.weight": (WIDTH - POS_DIM, TOKEN_DIM),
        "token_embed.proj.bias": (WIDTH - POS_DIM,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (WIDTH,), b + "norm1.bias": (WIDTH,),
            b + "mixer.qkv.weight": (3 * WIDTH, WIDTH), b + "mixer.qkv.bias": (3 * WIDTH,),
            b + "mixer.proj.weight": (WIDTH, WIDTH),  # no bias in the reference
            b + "norm2.weight": (WIDTH,), b + "norm2.bias": (WIDTH,),
            b + "mlp.fc1.weight": (MLP_HIDDEN, WIDTH), b + "mlp.fc1.bias": (MLP_HIDDEN,),
            b + "mlp.fc2.weight": (WIDTH, MLP_HIDDEN), b + "mlp.fc2.bias": (WIDTH,),
        })
    shapes.update({"norm.weight": (WIDTH,), "norm.bias": (WIDTH,)})
    return shapes


def reference_encoder_config(depth: int = 12) -> EncoderConfig:
    """Our config holding the reference exactly: base width, concatenated 30-dim sin-cos code,
    LayerNorm eps 1e-6, qkv with bias, attention output projection without bias, tanh GELU."""
    return encoder_config("base", depth=depth, pos_code="sincos_concat", pos_dim=POS_DIM, pos_base=10000.0,
                          norm_eps=1e-6, qkv_bias=True, proj_bias=False, mlp_ratio=4.0, token_dim=TOKEN_DIM,
                          mlp_act="gelu_tanh")


def resolve_reference(path: str) -> tuple[str, str | None]:
    """(weights file, config.json or None): a folder means ``<folder>/pytorch_model.bin``."""
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise ReferenceCheckpointError(f"{path}: folder has no {WEIGHTS_NAME}")
        cfg = os.path.join(path, "config.json")
    else:
        if not os.path.isfile(path):
            raise ReferenceCheckpointError(f"{path}: no such file")
        weights = path
        cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    return weights, (cfg if os.path.isfile(cfg) else None)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _read_raw(weights: str) -> Any:
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(weights)
        except Exception as e:  # safetensors has its own error types for corrupt headers
            raise ReferenceCheckpointError(f"{weights}: unreadable safetensors file ({_first_line(e)})") from None
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed objects, RuntimeError/EOFError for corrupt files
        raise ReferenceCheckpointError(f"{weights}: refused by weights-only loading "
                                       f"(not a plain tensor state dict: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The informative part of a loader error (torch's weights-only message is a paragraph)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    m = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+[^\n]*?\.)", text)
    if m:
        return m.group(1).rstrip(".")
    for line in text.splitlines():
        line = line.strip()
        if line and "weights only load failed" not in line.lower():
            return line[:300]
    return type(e).__name__


def normalize_reference_keys(state: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}``-style containers, strip wrapper prefixes (``module.``,
    ``encoder.``, ...) and drop positional buffers (recomputed from coordinates here)."""
    if not isinstance(state, Mapping):
        raise ReferenceCheckpointError(f"{source}: holds a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model", "encoder", "module"):
        inner = state.get(wrapper)
        if len(state) == 1 and isinstance(inner, Mapping):
            state = inner
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ReferenceCheckpointError(f"{source}: non-string key {key!r}")
        name = key
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, stripped = name[len(p):], True
        if _POSITIONAL.search(name):
            continue
        if name in out:
            raise ReferenceCheckpointError(f"{source}: key {key!r} duplicates {name!r} after removing prefixes")
        out[name] = value
    return out


def reference_depth(state: Mapping[str, Any], source: str = "state dict") -> int:
    """Number of blocks, from the highest ``blocks.i.`` index (gaps show up as missing keys)."""
    idx = [int(m.group(1)) for k in state if (m := _BLOCK.match(k))]
    if not idx:
        raise ReferenceCheckpointError(f"{source}: no 'blocks.i.' keys; not a reference encoder state dict")
    if max(idx) >= 64:  # a bogus index would otherwise build a huge expected-key table
        raise ReferenceCheckpointError(f"{source}: block index {max(idx)} is implausible (the reference has 12)")
    return max(idx) + 1


def validate_reference_state(state: Mapping[str, Any], source: str = "state dict") -> int:
    """Check every expected key, shape and dtype and refuse extra keys; returns the depth."""
    depth = reference_depth(state, source)
    expected = reference_shapes(depth)
    for name, shape in expected.items():
        if name not in state:
            raise ReferenceCheckpointError(f"{source}: missing key {name!r} (expected shape {_fmt(shape)})")
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ReferenceCheckpointError(f"{source}: key {name!r} holds a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise ReferenceCheckpointError(f"{source}: key {name!r} has shape {_fmt(t.shape)}, "
                                           f"expected {_fmt(shape)}")
        if not t.is_floating_point():
            raise ReferenceCheckpointError(f"{source}: key {name!r} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise ReferenceCheckpointError(f"{source}: key {name!r} contains NaN or infinite values")
    extra = sorted(set(state) - set(expected))
    if extra:
        found = state[extra[0]]
        shape = _fmt(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ReferenceCheckpointError(f"{source}: unexpected key {extra[0]!r} ({shape})"
                                       + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return depth


def load_reference_state(path: str) -> dict[str, torch.Tensor]:
    """Read (weights-only) and validate a reference checkpoint file or folder; returns the state
    dict with reference names, prefixes and positional buffers removed."""
    weights, _ = resolve_reference(path)
    state = normalize_reference_keys(_read_raw(weights), weights)
    validate_reference_state(state, weights)
    return state


def convert_reference_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference names -> our Encoder's names (identical by design: ``token_embed.proj``,
    ``blocks.i.{norm1,mixer.qkv,mixer.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), as float32."""
    state = normalize_reference_keys(state)
    validate_reference_state(state)
    return {name: state[name].detach().to(torch.float32).contiguous() for name in state}


def _read_reference_config(cfg_path: str | None, depth: int) -> dict[str, Any] | None:
    """The optional config.json, kept for provenance. Whatever it states about the architecture,
    the position code or the input statistics must agree with what the import assumes, otherwise
    the imported model would run silently different from the reference."""
    if cfg_path is None:
        return None
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ReferenceCheckpointError(f"{cfg_path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise ReferenceCheckpointError(f"{cfg_path}: not a JSON object")

    def refuse(what: str) -> None:
        raise ReferenceCheckpointError(f"{cfg_path}: {what}")

    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    params = model.get("params") if isinstance(model.get("params"), dict) else {}
    if model.get("which", "vit_base") not in ("vit_base", "vit"):
        refuse(f"model.which = {model.get('which')!r}; only the ViT-B layout is supported")
    wants = {"depth": depth, "num_layers": depth, "num_hidden_layers": depth, "embed_dim": WIDTH,
             "width": WIDTH, "hidden_size": WIDTH, "num_heads": WIDTH // 64}
    for scope in (cfg, params):
        for key, want in wants.items():
            got = scope.get(key)
            if isinstance(got, (int, float)) and not isinstance(got, bool) and got != want:
                refuse(f"{key} = {got} disagrees with the weights ({want})")
    pos = params.get("pos_emb_cf")
    if isinstance(pos, dict):
        pp = pos.get("params") if isinstance(pos.get("params"), dict) else {}
        if (pos.get("which", "pe3d") != "pe3d" or pp.get("d", POS_DIM) != POS_DIM
                or pp.get("concat", True) is not True or float(pp.get("pe_factor", 1.0)) != 1.0):
            refuse(f"position code {pos} is not the concatenated, unscaled 30-dim PositionalEncoding3D")
    stats = cfg.get("normalization_stats")
    if stats is not None:
        from neurovfm.tokens.normalize import VIEW_STATS

        order = ("mr", "brain", "blood", "bone")  # the reference's [[means], [stds]] order
        ours = [[VIEW_STATS[v][0] for v in order], [VIEW_STATS[v][1] for v in order]]
        try:
            same = all(abs(float(a) - b) < 1e-4 for row, mine in zip(stats, ours, strict=True)
                       for a, b in zip(row, mine, strict=True))
        except (TypeError, ValueError):
            same = False
        if not same:
            refuse(f"normalization_stats {stats} differ from this package's per-view statistics {ours}")
    return cfg


def import_reference(src: str, out_folder: str, provenance_note: str | None = None,
                     command: list[str] | None = None) -> ImportResult:
    """Validate the reference checkpoint at ``src`` and write it as our model folder at
    ``out_folder`` (loaded strictly, so nothing is silently left at random init)."""
    from neurovfm.models.folder import make_provenance, save_encoder
    from neurovfm.tokens.normalize import VIEW_STATS

    weights, cfg_path = resolve_reference(src)
    state = load_reference_state(src)
    depth = reference_depth(state, weights)
    ref_cfg = _read_reference_config(cfg_path, depth)
    enc = Encoder(reference_encoder_config(depth))
    enc.load_state_dict(convert_reference_state(state), strict=True)
    enc.eval()
    digest = file_sha256(weights)
    init = {
        "kind": "imported_reference",
        "source": os.path.abspath(weights),
        "source_sha256": digest,
        "source_bytes": os.path.getsize(weights),
        "reference_config": ref_cfg,
        "reference_config_sha256": file_sha256(cfg_path) if cfg_path else None,
        "depth": depth,
        "input_normalization": {k: {"mean": m, "std": s} for k, (m, s) in VIEW_STATS.items()},
        "note": provenance_note,
    }
    prov = make_provenance(command=command if command is not None else sys.argv, init=init, license=LICENSE_NOTE)
    save_encoder(enc, out_folder, provenance=prov)
    n = sum(p.numel() for p in enc.parameters())
    return ImportResult(folder=out_folder, n_params=n, depth=depth, source=weights, sha256=digest)
