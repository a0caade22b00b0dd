"""Attention rollout over the encoder: carries a head's per-token attention (which weighs the
encoder's *outputs*) back to the *input* tokens through every layer's self-attention (head-mean,
with the residual path as 0.5 identity, rows renormalised), so a map can show which input
patches fed the tokens the head looked at. Rows of the rollout sum to one, so each class's map
keeps its mass. Features read from several blocks (``readout``) roll out through each of those
depths and average, as the features themselves are averaged."""

from __future__ import annotations

import numpy as np
import torch

from neurovfm.models.encoder import resolve_readout
from neurovfm.models.packing import Packed
from neurovfm.tokens.normalize import normalize


def rollout_matrix(encoder: torch.nn.Module, u8: np.ndarray, coords: np.ndarray, view: str,
                   residual: float = 0.5, readout: list[int] | None = None) -> np.ndarray:
    """[L, L] rollout of one series view: row i = how much output token i draws on each input token
    (``readout``: the blocks the features are read from, as in :func:`Encoder.forward`)."""
    depth = len(encoder.blocks)
    keep = resolve_readout(readout, depth)
    packed = Packed.cat([(normalize(np.asarray(u8), view), torch.from_numpy(np.asarray(coords, np.int64)))])
    with torch.inference_mode():
        _, weights = encoder(packed, attention_layers=list(range(keep[-1] + 1)))
    n = len(u8)
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.clone()
    total = torch.zeros_like(eye)
    for i, layer in enumerate(weights):
        a = layer[0].double().mean(0)  # [L, L], head mean
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        r = a @ r
        if i in keep:
            total += r
    return (total / len(keep)).numpy()


def rollout_attention(encoder: torch.nn.Module, views: list[tuple[np.ndarray, np.ndarray, str]],
                      attn: np.ndarray, readout: list[int] | None = None) -> np.ndarray:
    """Per-view head attention [T, C] (views concatenated in order) -> the same mass on input tokens."""
    out = np.empty_like(attn)
    off = 0
    for u8, coords, view in views:
        n = len(u8)
        r = rollout_matrix(encoder, u8, coords, view, readout=readout)
        out[off:off + n] = r.T @ attn[off:off + n]
        off += n
    return out
