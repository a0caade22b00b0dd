"""The JEPA predictor: context features + mask tokens at target positions -> target latents.

Per series, the sequence is [context outputs ; one learned mask token per target position],
each carrying its own position (concatenated code or rotary phases, as the encoder). Series
are packed as in the encoder, so attention stays within a series.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from neurovfm.models.config import EncoderConfig, PredictorConfig
from neurovfm.models.encoder import BlockStack, init_vit_weights, position_code


def interleave_index(cu_a: list[int], cu_b: list[int], device) -> tuple[torch.Tensor, list[int]]:
    """Order that puts series b's A-rows then its B-rows together, for cat([A, B]).

    Returns the gather index into cat([A, B]) and the cumulative lengths of the result.
    """
    na = cu_a[-1]
    idx, cu = [], [0]
    for i in range(len(cu_a) - 1):
        idx.append(torch.arange(cu_a[i], cu_a[i + 1], device=device))
        idx.append(torch.arange(na + cu_b[i], na + cu_b[i + 1], device=device))
        cu.append(cu[-1] + (cu_a[i + 1] - cu_a[i]) + (cu_b[i + 1] - cu_b[i]))
    return torch.cat(idx), cu


class Predictor(nn.Module):
    def __init__(self, enc_cfg: EncoderConfig, cfg: PredictorConfig):
        super().__init__()
        self.enc_cfg = enc_cfg
        self.cfg = cfg
        self.stack_cfg = cfg.as_encoder(enc_cfg)
        self.stack = BlockStack(self.stack_cfg)
        self.embed = nn.Linear(enc_cfg.width, self.stack_cfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(self.stack_cfg.embed_dim))
        self.out = nn.Linear(cfg.width, enc_cfg.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_vit_weights(self, self.stack.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _with_position(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        if self.stack_cfg.pos_code == "sincos_concat":
            return torch.cat((x, position_code(self.stack_cfg, coords).to(x.dtype)), dim=-1)
        return x

    def forward(self, ctx: torch.Tensor, ctx_coords: torch.Tensor, cu_ctx: list[int],
                tgt_coords: torch.Tensor, cu_tgt: list[int]) -> torch.Tensor:
        """Predictions [N_tgt, encoder width] in the packed target order."""
        a = self._with_position(self.embed(ctx), ctx_coords)
        m = self.mask_token.to(a.dtype).expand(tgt_coords.shape[0], -1)
        b = self._with_position(m, tgt_coords)
        idx, cu = interleave_index(cu_ctx, cu_tgt, ctx.device)
        x = torch.cat((a, b))[idx]
        coords = torch.cat((ctx_coords, tgt_coords))[idx]
        y, _ = self.stack.run(x, coords, cu)
        # rows that were targets, back in packed target order
        is_tgt = idx >= a.shape[0]
        order = idx[is_tgt] - a.shape[0]
        pred = torch.empty((tgt_coords.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
        pred[order] = y[is_tgt]
        return self.out(pred)
