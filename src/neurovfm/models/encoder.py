"""The 3D ViT encoder over packed foreground tokens.

Parameter names and shapes follow the reference checkpoint (SPEC.md section 5) so that its
ViT-B weights load exactly: ``token_embed.proj``, ``blocks.i.{norm1, mixer.qkv, mixer.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``. Pre-norm blocks, LayerNorm eps 1e-6, GELU MLP, no class
token. Position: the 30-dim sinusoidal code concatenated after the patch features
(``sincos_concat``) or 3D rotary phases in every attention layer (``rope3d``); both computed
from coordinates on the fly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from neurovfm.models.attention import attention_weights, packed_attention, resolve_backend
from neurovfm.models.config import EncoderConfig
from neurovfm.models.packing import Packed
from neurovfm.models.position import Rope3D, sincos_3d


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"  # tanh: the reference's fused MLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    """Multi-head self-attention; ``mixer`` in the reference's names."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, cu: list[int], backend: str, rope: Rope3D | None = None,
                weights_out: list | None = None) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.heads, -1)
        q, k, v = qkv.unbind(1)  # each [N, H, d], views
        if rope is not None:
            q, k = rope.apply_tokens_first(q), rope.apply_tokens_first(k)
        if weights_out is not None:
            weights_out.append(attention_weights(q, k, cu))
        o = packed_attention(q, k, v, cu, backend)  # [N, H, d]
        return self.proj(o.reshape(n, -1))

    def forward_padded(self, x: torch.Tensor, valid: torch.Tensor, rope: Rope3D | None = None) -> torch.Tensor:
        """[B, L, C] with a key-padding mask (the reference's inference path)."""
        b, L, _ = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, L, d]
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.proj(o.transpose(1, 2).reshape(b, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mixer = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.mlp_act)

    def forward(self, x, cu, backend, rope=None, weights_out=None):
        x = x + self.mixer(self.norm1(x), cu, backend, rope, weights_out)
        return x + self.mlp(self.norm2(x))

    def forward_padded(self, x, valid, rope=None):
        x = x + self.mixer.forward_padded(self.norm1(x), valid, rope)
        return x + self.mlp(self.norm2(x))


class TokenEmbed(nn.Module):
    """Linear patch projection; with ``sincos_concat`` the position code is appended after it."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.token_dim, cfg.embed_dim)

    def forward(self, tokens: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens)
        if self.cfg.pos_code == "sincos_concat":
            x = torch.cat((x, position_code(self.cfg, coords).to(x.dtype)), dim=-1)
        return x


def position_code(cfg: EncoderConfig, coords: torch.Tensor) -> torch.Tensor:
    return sincos_3d(coords, cfg.pos_dim, cfg.pos_base)


def init_vit_weights(module: nn.Module, blocks: nn.ModuleList) -> None:
    """Truncated-normal linears, unit norms, and depth-scaled residual output projections
    (keeps the residual stream's variance bounded as depth grows)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, blk in enumerate(blocks):
        blk.mixer.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
        blk.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)


def resolve_readout(layers, depth: int) -> tuple[int, ...]:
    """Block indices of a feature readout (``None``: the last block; negative: from the end) as
    sorted absolute indices; out-of-range or repeated indices are refused."""
    if layers is None:
        return (depth - 1,)
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("readout layers: give at least one block index")
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"readout layers {bad} out of range for an encoder of {depth} blocks "
                         f"(use 0..{depth - 1} or -{depth}..-1)")
    out = sorted(i % depth for i in layers)
    if len(set(out)) != len(out):
        raise ValueError(f"readout layers {layers}: a block is named twice")
    return tuple(out)


class BlockStack(nn.Module):
    """Blocks + final norm: shared by the encoder and the predictor."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def _rope(self, coords: torch.Tensor) -> Rope3D | None:
        return Rope3D(coords, self.cfg.head_dim, self.cfg.pos_base) if self.cfg.pos_code == "rope3d" else None

    def run(self, x: torch.Tensor, coords: torch.Tensor, cu: list[int], attention_layers=None,
            readout_layers=None):
        """Blocks then the final norm. ``readout_layers`` (block indices, negative from the end):
        the mean of those blocks' outputs, each through the final norm, instead of the last's;
        blocks after the deepest one asked for (outputs or attention) are not run."""
        backend = resolve_backend(self.cfg.attention, x.device)
        rope = self._rope(coords)
        weights: list = []
        want = set() if attention_layers is None else set(
            i % len(self.blocks) for i in attention_layers)
        keep = set(resolve_readout(readout_layers, len(self.blocks)))
        last = max(keep | want)
        acc = None
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            w = weights if i in want else None
            if self.cfg.checkpoint_activations and self.training and w is None:
                x = checkpoint(blk, x, cu, backend, rope, None, use_reentrant=False)
            else:
                x = blk(x, cu, backend, rope, w)
            if i in keep:
                y = self.norm(x)
                acc = y if acc is None else acc + y
        return (acc if len(keep) == 1 else acc / len(keep)), weights

    def run_padded(self, x: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor):
        rope = self._rope(coords)
        if rope is not None:
            rope.with_head_axis()
        for blk in self.blocks:
            x = blk.forward_padded(x, valid, rope)
        return self.norm(x)


class Encoder(BlockStack):
    """Packed 3D ViT. ``forward(Packed) -> [N, width]`` (attention only within each series)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.token_embed = TokenEmbed(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_vit_weights(self, self.blocks)

    def forward(self, batch: Packed, attention_layers: list[int] | None = None,
                readout_layers: list[int] | None = None):
        """Features [N, width]; with ``attention_layers`` also per-layer lists of [H, L, L] weights;
        ``readout_layers`` averages the final-normed outputs of those blocks (default: the last)."""
        x = self.token_embed(batch.tokens, batch.coords)
        out, weights = self.run(x, batch.coords, batch.cu, attention_layers, readout_layers)
        return (out, weights) if attention_layers is not None else out

    def forward_padded(self, tokens: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Padded [B, L, T] input with a validity mask: the reference's inference path."""
        x = self.token_embed(tokens.flatten(0, 1), coords.flatten(0, 1)).unflatten(0, tokens.shape[:2])
        return self.run_padded(x, coords, valid)
