"""Variable-length self-attention over packed series (attention stays within each series).

A packed batch is ``x [N, C]`` with ``cu_seqlens [B+1]`` (series b owns rows
``cu[b]:cu[b+1]``); no padding anywhere. Backends, all PyTorch's own kernels unless stated:

- ``loop``: ``scaled_dot_product_attention`` per group of equal-length series (a CT series'
  three windows share one length, so they run as one batched call). No wasted FLOPs. The
  CPU default, chosen by ``bench/encoder`` measurements.
- ``mask``: one SDPA call with a block-diagonal boolean mask; O(N^2) memory, for small N.
- ``nested``: nested jagged tensors through SDPA.
- ``flex``: FlexAttention with a document block mask (compiled; best on GPUs).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels shipped with
  PyTorch; CUDA only). The CUDA default.
- ``flash``: ``flash_attn_varlen_func`` from the optional ``flash-attn`` package (CUDA only),
  used only if installed.

``auto`` resolves per device: CUDA -> flash (if installed) -> varlen -> loop; CPU -> loop.
Every backend computes the same function; the tests check them against each other.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F

from neurovfm.errors import NeuroVFMError


class AttentionBackendError(NeuroVFMError):
    """A requested attention backend cannot run here (missing package or wrong device)."""


@functools.lru_cache(maxsize=None)
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_varlen() -> bool:
    try:
        from torch.nn.attention import varlen  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that will actually run for ``name`` on ``device``."""
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda and _has_flash_attn():
            return "flash"
        if cuda and _has_varlen():
            return "varlen"
        return "loop"
    if name in ("varlen", "flash") and not cuda:
        raise AttentionBackendError(f"attention backend {name!r} needs a CUDA device (got {device})")
    if name == "flash" and not _has_flash_attn():
        raise AttentionBackendError("attention backend 'flash' needs the flash-attn package")
    if name == "varlen" and not _has_varlen():
        raise AttentionBackendError("this PyTorch has no torch.nn.attention.varlen")
    return name


def _segments(cu: list[int]) -> list[tuple[int, int]]:
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]


def _loop(q, k, v, cu: list[int]) -> torch.Tensor:
    """q, k, v: [H, N, d]. Equal-length series are batched into one SDPA call."""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for s, e in _segments(cu):
        by_len.setdefault(e - s, []).append(s)
    for length, starts in by_len.items():
        if len(starts) == 1:
            s = starts[0]
            out[:, s:s + length] = F.scaled_dot_product_attention(q[:, s:s + length], k[:, s:s + length], v[:, s:s + length])
            continue
        idx = torch.cat([torch.arange(s, s + length, device=q.device) for s in starts])
        qs, ks, vs = (t[:, idx].unflatten(1, (len(starts), length)).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs)  # [G, H, L, d]
        out[:, idx] = o.transpose(0, 1).flatten(1, 2)
    return out


def segment_ids(cu: list[int], device) -> torch.Tensor:
    lengths = torch.tensor([cu[i + 1] - cu[i] for i in range(len(cu) - 1)], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def _mask(q, k, v, cu: list[int]) -> torch.Tensor:
    seg = segment_ids(cu, q.device)
    m = seg[:, None] == seg[None, :]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=m[None, None])[0]


def _nested(q, k, v, cu: list[int]) -> torch.Tensor:
    offsets = torch.tensor(cu, device=q.device, dtype=torch.int64)

    def nt(t):  # [H, N, d] -> nested [B, H, j, d]
        return torch.nested.nested_tensor_from_jagged(t.transpose(0, 1).contiguous(), offsets).transpose(1, 2)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
        o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v))
    return o.transpose(1, 2).values().transpose(0, 1)


@functools.lru_cache(maxsize=8)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, cu: list[int]) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(cu, q.device)
    n = q.shape[1]

    def same_series(b, h, qi, ki):
        return seg[qi] == seg[ki]

    bm = create_block_mask(same_series, None, None, n, n, device=q.device)
    if q.device.type == "cuda":
        return _compiled_flex()(q[None], k[None], v[None], block_mask=bm)[0]
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # eager on CPU (unfused, for reference and measurement)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q[None], k[None], v[None], block_mask=bm)[0]


def _varlen(q, k, v, cu: list[int]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu_t = torch.tensor(cu, device=q.device, dtype=torch.int32)
    mx = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    o = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_t, cu_t, mx, mx)
    return o.transpose(0, 1)


def _flash(q, k, v, cu: list[int]) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_t = torch.tensor(cu, device=q.device, dtype=torch.int32)
    mx = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    o = flash_attn_varlen_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_t, cu_t, mx, mx)
    return o.transpose(0, 1)


_BACKENDS = {"loop": _loop, "mask": _mask, "nested": _nested, "flex": _flex, "varlen": _varlen, "flash": _flash}
_HALF_ONLY = {"varlen", "flash"}


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int], backend: str) -> torch.Tensor:
    """Attention within each series. q, k, v: [H, N, d]; returns [H, N, d]."""
    if backend in _HALF_ONLY and q.dtype == torch.float32:
        # FlashAttention kernels take half precision only; run fp32 inputs in bf16 with a warning once
        _warn_once(f"attention backend {backend!r} runs fp32 inputs in bfloat16")
        return _BACKENDS[backend](q.bfloat16(), k.bfloat16(), v.bfloat16(), cu).to(q.dtype)
    return _BACKENDS[backend](q, k, v, cu)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def attention_weights(q: torch.Tensor, k: torch.Tensor, cu: list[int]) -> list[torch.Tensor]:
    """Explicit softmax(q k^T / sqrt(d)) per series: a list of [H, L, L] float32 tensors."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        a = (q[:, s:e].float() @ k[:, s:e].float().transpose(-1, -2)) * scale
        out.append(a.softmax(dim=-1))
    return out
