"""Encoder and predictor configurations: typed, validated, and named sizes.

``base`` is the reference ViT-B (SPEC.md section 5): width 768, 12 layers, 12 heads, MLP 4x,
a 1024 -> 738 patch projection with a 30-dim 3D sinusoidal code concatenated after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

POS_CODES = ("sincos_concat", "rope3d")
ATTENTION_BACKENDS = ("auto", "loop", "mask", "nested", "flex", "varlen", "flash")
MLP_ACTS = ("gelu", "gelu_tanh")  # gelu_tanh: the reference's fused MLP (flash-attn "gelu_approx")


@dataclass(frozen=True)
class EncoderConfig:
    """A pre-norm 3D ViT over packed foreground tokens (no class token)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    token_dim: int = 1024  # 4 x 16 x 16 voxels flattened in (d, h, w) order
    pos_code: str = "sincos_concat"  # the reference's concatenated 30-dim code, or "rope3d"
    pos_dim: int = 30  # sincos_concat only: 10 per axis
    pos_base: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    proj_bias: bool = False  # the reference's attention output projection has no bias
    attention: str = "auto"
    checkpoint_activations: bool = False
    mlp_act: str = "gelu"  # "gelu_tanh" for imported reference weights (models/reference.py)

    def __post_init__(self) -> None:
        if self.pos_code not in POS_CODES:
            raise ValueError(f"pos_code must be one of {POS_CODES}, got {self.pos_code!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pos_code == "sincos_concat":
            if self.pos_dim % 6 or self.pos_dim >= self.width:
                raise ValueError(f"pos_dim must be a multiple of 6 below width, got {self.pos_dim}")
        if self.pos_code == "rope3d" and self.head_dim < 6:
            raise ValueError("rope3d needs a head dimension of at least 6")
        if min(self.depth, self.heads, self.token_dim) < 1 or self.mlp_ratio <= 0:
            raise ValueError("depth, heads, token_dim and mlp_ratio must be positive")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def embed_dim(self) -> int:
        """Output width of the patch projection (width minus the concatenated code)."""
        return self.width - self.pos_dim if self.pos_code == "sincos_concat" else self.width

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["mlp_act"] == "gelu":  # written only when not the default: other folders stay as before
            del d["mlp_act"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder config keys: {sorted(unknown)}")
        return cls(**d)


SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(width=192, depth=12, heads=3),
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),
    "large": dict(width=1024, depth=24, heads=16),
}


def encoder_config(size: str = "base", **overrides: Any) -> EncoderConfig:
    """A named size (tiny / small / base / large) with optional overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown encoder size {size!r}; choose from {sorted(SIZES)}")
    return EncoderConfig(**{**SIZES[size], **overrides})


@dataclass(frozen=True)
class PredictorConfig:
    """The JEPA predictor: a (usually narrower) ViT from context outputs to target latents."""

    width: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"predictor width {self.width} is not divisible by heads {self.heads}")

    def as_encoder(self, enc: EncoderConfig) -> EncoderConfig:
        """The block stack of the predictor, sharing the encoder's position code and backend."""
        return replace(enc, width=self.width, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                       token_dim=enc.width)
