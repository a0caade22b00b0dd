"""Position codes computed on the fly from integer token coordinates (no lookup table).

The reference keeps a precomputed table over the whole grid (about 566 MB per model copy);
here a code costs O(tokens x dim) and is computed from the (d, h, w) coordinates each forward.

``sincos_3d`` reproduces ``PositionalEncoding3D(dim)`` of the ``positional-encodings`` package at
the given coordinates: per axis, ``dim / 3`` channels of interleaved (sin, cos) pairs over
frequencies ``base ** (-2i / (dim / 3))``, concatenated in (d, h, w) order.

``Rope3D`` is the modern alternative: rotary phases on queries and keys, the head dimension
split in three equal even parts (one per axis; any remainder is left unrotated), so attention
depends on relative offsets only.
"""

from __future__ import annotations

import torch


def _axis_freqs(channels: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, channels, 2, device=device, dtype=torch.float32) / channels))


def sincos_3d(coords: torch.Tensor, dim: int = 30, base: float = 10000.0) -> torch.Tensor:
    """[N, 3] integer coordinates -> [N, dim] float32 code (``dim`` a multiple of 6)."""
    if dim % 6:
        raise ValueError(f"sincos_3d needs a multiple of 6, got {dim}")
    per_axis = dim // 3
    freqs = _axis_freqs(per_axis, base, coords.device)  # [per_axis / 2]
    ang = coords.to(torch.float32)[:, :, None] * freqs  # [N, 3, per_axis / 2]
    code = torch.stack((ang.sin(), ang.cos()), dim=-1)  # [N, 3, per_axis/2, 2]: interleaved pairs
    return code.reshape(coords.shape[0], dim)


class Rope3D:
    """Rotary phases for [..., 3] coordinates, applied to [heads, N, head_dim] tensors."""

    def __init__(self, coords: torch.Tensor, head_dim: int, base: float = 10000.0):
        per_axis = (head_dim // 3) // 2 * 2
        self.rotated = per_axis * 3
        freqs = _axis_freqs(per_axis, base, coords.device)  # [per_axis/2]
        ang = coords.to(torch.float32)[..., None] * freqs  # [..., 3, per_axis/2]
        ang = ang.flatten(-2)  # [..., rotated/2]
        self.cos = ang.cos()
        self.sin = ang.sin()

    def with_head_axis(self) -> "Rope3D":
        """For padded [B, H, L, d] inputs: phases [B, L, r] become [B, 1, L, r]."""
        self.cos, self.sin = self.cos[:, None], self.sin[:, None]
        return self

    def apply_tokens_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, H, d] (packed layout, tokens first)."""
        return self.apply(x.transpose(0, 1)).transpose(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate consecutive pairs of the first ``rotated`` channels of x [..., N, head_dim]."""
        rot, rest = x[..., : self.rotated], x[..., self.rotated:]
        pairs = rot.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = self.cos, self.sin
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
