"""Packed batches: many series' tokens in one [N, ...] tensor, with cumulative lengths.

The padded form ([B, L_max, ...] plus a key-padding mask) is kept only for comparisons (the
reference's inference path, and the packed-equals-padded test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """``tokens`` [N, T] float, ``coords`` [N, 3] long, ``cu`` cumulative series lengths (B+1)."""

    tokens: torch.Tensor
    coords: torch.Tensor
    cu: list[int]

    def __post_init__(self) -> None:
        if self.cu[0] != 0 or self.cu[-1] != self.tokens.shape[0] or any(
                b < a for a, b in zip(self.cu, self.cu[1:])):
            raise ValueError(f"cu_seqlens {self.cu[:4]}... do not describe {self.tokens.shape[0]} tokens")
        if self.coords.shape != (self.tokens.shape[0], 3):
            raise ValueError(f"coords shape {tuple(self.coords.shape)} != ({self.tokens.shape[0]}, 3)")

    @property
    def n_series(self) -> int:
        return len(self.cu) - 1

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.cu, self.cu[1:])]

    def to(self, device, dtype=None) -> "Packed":
        t = self.tokens.to(device=device, dtype=dtype or self.tokens.dtype, non_blocking=True)
        return Packed(t, self.coords.to(device, non_blocking=True), list(self.cu))

    @staticmethod
    def cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> "Packed":
        """Pack a list of (tokens [n_i, T], coords [n_i, 3])."""
        cu = [0]
        for t, _ in parts:
            cu.append(cu[-1] + t.shape[0])
        return Packed(torch.cat([t for t, _ in parts]), torch.cat([c for _, c in parts]).long(), cu)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a packed [N, ...] tensor back into per-series pieces."""
        return list(torch.split(x, self.lengths))


def pad(x: torch.Tensor, cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [N, C] -> padded [B, L, C] and a boolean validity mask [B, L]."""
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    L = max(lengths) if lengths else 0
    out = x.new_zeros((len(lengths), L) + tuple(x.shape[1:]))
    valid = torch.zeros((len(lengths), L), dtype=torch.bool, device=x.device)
    for i, (a, n) in enumerate(zip(cu, lengths)):
        out[i, :n] = x[a:a + n]
        valid[i, :n] = True
    return out, valid


def unpad(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x[valid]
