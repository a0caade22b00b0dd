"""Per-series Perceiver resampler.

A fixed set of learned latents attends to one series' token features; each layer is a
pre-norm cross-attention (latents -> tokens) followed by a pre-norm MLP, both residual.
Series are packed (features [T, D] with cumulative offsets cu [S+1]); attention never
crosses series because every series is resampled on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ResamplerConfig:
    in_dim: int = 768        # encoder token feature width
    width: int = 768         # latent width
    latents: int = 64
    layers: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, lat: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(lat)
        k = self.norm_kv(kv)
        lat = lat + self.attn(q, k, k, need_weights=False)[0]
        return lat + self.mlp(self.norm_mlp(lat))


class PerceiverResampler(nn.Module):
    def __init__(self, config: ResamplerConfig | None = None):
        super().__init__()
        self.config = c = config or ResamplerConfig()
        if c.width % c.heads:
            raise ValueError(f"width {c.width} is not divisible by heads {c.heads}")
        self.proj = nn.Linear(c.in_dim, c.width) if c.in_dim != c.width else nn.Identity()
        self.latents = nn.Parameter(torch.randn(c.latents, c.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.norm_out = nn.LayerNorm(c.width)

    def forward(self, features: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """features [T, in_dim], cu [S+1] cumulative offsets -> [S, latents, width]."""
        if features.dim() != 2:
            raise ValueError(f"features must be [T, D], got {tuple(features.shape)}")
        cu = [int(v) for v in torch.as_tensor(cu).tolist()]
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != features.shape[0] or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"bad offsets cu={cu} for {features.shape[0]} tokens")
        x = self.proj(features)
        out = []
        for a, b in zip(cu, cu[1:]):
            kv = x[a:b].unsqueeze(0)
            lat = self.latents.unsqueeze(0)
            for blk in self.blocks:
                lat = blk(lat, kv)
            out.append(self.norm_out(lat[0]))
        return torch.stack(out)
