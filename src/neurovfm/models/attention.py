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


def equal_length_runs(cu: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive series of one length as (start, count, length) runs (a CT series' three
    windows are one run), so each run is a single batched attention call on views."""
    runs: list[tuple[int, int, int]] = []
    for s, e in _segments(cu):
        L = e - s
        if runs and runs[-1][2] == L and runs[-1][0] + runs[-1][1] * L == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, L)
        else:
            runs.append((s, 1, L))
    return runs


def _loop(q, k, v, cu: list[int]) -> torch.Tensor:
    """q, k, v: [N, H, d]. One SDPA call per run of equal-length series, on views (no copies)."""
    runs = equal_length_runs(cu)
    out = None if len(runs) == 1 else q.new_empty(q.shape)
    for s, g, L in runs:
        e = s + g * L
        qs, ks, vs = (t[s:e].unflatten(0, (g, L)).transpose(1, 2) for t in (q, k, v))  # [G, H, L, d] views
        o = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)  # [G, L, H, d] view
        if out is None:
            return o.reshape(q.shape)  # one copy
        out[s:e].unflatten(0, (g, L)).copy_(o)  # one copy, straight into place
    return out


def segment_ids(cu: list[int], device) -> torch.Tensor:
    lengths = torch.tensor([cu[i + 1] - cu[i] for i in range(len(cu) - 1)], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def _mask(q, k, v, cu: list[int]) -> torch.Tensor:
    seg = segment_ids(cu, q.device)
    m = seg[:, None] == seg[None, :]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=m[None, None])
    return o[0].transpose(0, 1)


def _nested(q, k, v, cu: list[int]) -> torch.Tensor:
    offsets = torch.tensor(cu, device=q.device, dtype=torch.int64)

    def nt(t):  # [N, H, d] -> nested [B, H, j, d]
        return torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
        o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v))
    return o.transpose(1, 2).values()


@functools.lru_cache(maxsize=8)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, cu: list[int]) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(cu, q.device)
    n = q.shape[0]

    def same_series(b, h, qi, ki):
        return seg[qi] == seg[ki]

    bm = create_block_mask(same_series, None, None, n, n, device=q.device)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    if q.device.type == "cuda":
        return _compiled_flex()(qh, kh, vh, block_mask=bm)[0].transpose(0, 1)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # eager on CPU (unfused, for reference and measurement)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(qh, kh, vh, block_mask=bm)[0].transpose(0, 1)


def _varlen(q, k, v, cu: list[int]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu_t = torch.tensor(cu, device=q.device, dtype=torch.int32)
    mx = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    return varlen_attn(q, k, v, cu_t, cu_t, mx, mx)


def _flash(q, k, v, cu: list[int]) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_t = torch.tensor(cu, device=q.device, dtype=torch.int32)
    mx = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    return flash_attn_varlen_func(q, k, v, cu_t, cu_t, mx, mx)


_BACKENDS = {"loop": _loop, "mask": _mask, "nested": _nested, "flex": _flex, "varlen": _varlen, "flash": _flash}
_HALF_ONLY = {"varlen", "flash"}


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int], backend: str) -> torch.Tensor:
    """Attention within each series. q, k, v: [N, H, d] (views are fine); returns [N, H, d]."""
    if backend in _HALF_ONLY and q.dtype == torch.float32:
        # FlashAttention kernels take half precision only; run fp32 inputs in bf16 with a warning once
        _warn_once(f"attention backend {backend!r} runs fp32 inputs in bfloat16")
        return _BACKENDS[backend](q.bfloat16(), k.bfloat16(), v.bfloat16(), cu).to(q.dtype)
    return _BACKENDS[backend](q, k, v, cu)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def attention_weights(q: torch.Tensor, k: torch.Tensor, cu: list[int]) -> list[torch.Tensor]:
    """Explicit softmax(q k^T / sqrt(d)) per series from [N, H, d]: a list of [H, L, L] float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        qs, ks = q[s:e].float().transpose(0, 1), k[s:e].float().transpose(0, 1)
        a = (qs @ ks.transpose(-1, -2)) * scale
        out.append(a.softmax(dim=-1))
    return out
