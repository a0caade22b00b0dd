"""Study-level heads over every token of every series of a study (multiple-instance learning).

All heads take a batch of studies as packed token features ``feats [T, D]`` with cumulative
offsets ``cu [B+1]`` and return ``(logits [B, C], attn [T, C])``; ``attn`` sums to one per class
within each study, so it is directly a map of where each finding was seen.

* ``gated``: the reference's classify-then-aggregate head (SPEC.md): per class a gated attention
  (tanh x sigmoid) over tokens, a token-level MLP giving per-token logits, the study logit their
  attention-weighted sum times a learnable per-class scale plus bias.
* ``abmil``: aggregate-then-classify: the same gated attention pools the token features per
  class, and a per-class linear classifier reads the pooled vector.
* ``mean``: mean of the tokens -> linear (uniform attention): the simplest baseline.
* ``topk``: instance-level MIL: the same token MLP scores every token per class, and the study
  logit is the mean of each class's ``top_k`` highest token scores plus a bias (attention = 1/k
  on those tokens). Its inductive bias is "a finding is present when a few tokens look like it",
  which ties the map to the decision: the tokens that made the logit are the map.

``standardize``: every head first maps each feature dimension to zero mean and unit spread with
statistics of the training split's tokens (fixed buffers saved with the head), as linear probes
of self-supervised encoders commonly do (e.g. MAE's BatchNorm without affine before its linear
probe), since a per-token LayerNorm does not equalise dimensions. Measured on the default
archive (README, *Standardised features*): no AUROC gain for Vol-JEPA or random-init features, a
loss for the histogram on CT, and a 2.5-6x smaller spread over head seeds for ViT features.

``ensemble > 1`` builds that many heads of one kind, trained with consecutive seeds, whose logits,
attention and token contributions are averaged: on a few hundred training studies the seed of a
head moves test AUROC by up to 0.15 (measured: README, *Seed spread*), and a mean over seeds depends
far less on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class HeadConfig:
    kind: str = "gated"  # gated | abmil | mean | topk
    hidden: int | None = None  # token MLP width (default dim // 2, the reference's 768 -> 384)
    attn_dim: int = 128  # gated attention width
    dropout: float = 0.1
    top_k: int = 4  # topk head: tokens averaged per class (fewer when a study has fewer tokens)
    ensemble: int = 1  # heads (seeds) whose logits are averaged
    standardize: bool = False  # per-dimension z-score of token features, train-split statistics
    std_floor: float = 0.01  # standardize: a dimension's spread is at least this share of the RMS spread

    def __post_init__(self) -> None:
        if self.kind not in ("gated", "abmil", "mean", "topk"):
            raise ValueError(f"head kind must be gated, abmil, mean or topk, not {self.kind!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.ensemble < 1:
            raise ValueError("ensemble must be >= 1")
        if not 0 < self.std_floor <= 1:
            raise ValueError("std_floor must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def study_index(cu: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Study number of every token [T] from offsets [B+1]."""
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=n_tokens)


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Softmax of ``scores [T, C]`` within each segment (study), numerically stable."""
    c = scores.shape[1]
    idx = seg[:, None].expand(-1, c)
    top = torch.full((n_seg, c), -torch.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - top[seg])
    tot = torch.zeros((n_seg, c), dtype=scores.dtype, device=scores.device).index_add(0, seg, e)
    return e / tot[seg]


class FeatureStandardizer(nn.Module):
    """(x - mean) / spread per feature dimension, with statistics fitted once on training tokens
    and kept as buffers (saved and loaded with the head; not trained).

    A dimension's spread is floored at ``floor`` times the RMS spread over dimensions, so that a
    dead or float16-quantised dimension is not blown up into noise."""

    def __init__(self, dim: int, floor: float = 0.01):
        super().__init__()
        self.floor = floor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, bags) -> "FeatureStandardizer":
        """Statistics over every token of ``bags`` (arrays or tensors [n_i, D]), in float64."""
        d = self.mean.numel()
        n, s, ss = 0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        for b in bags:
            x = torch.as_tensor(b).to(torch.float64).reshape(-1, d)
            n += len(x)
            s += x.sum(0)
            ss += (x * x).sum(0)
        if n < 2:
            raise ValueError("feature standardisation needs at least two training tokens")
        mean = s / n
        var = (ss / n - mean * mean).clamp(min=0.0)
        floor = self.floor ** 2 * var.mean()
        self.mean.copy_(mean.float())
        self.inv_std.copy_(torch.rsqrt(var.clamp(min=float(floor)) + 1e-12).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def _pre(dim: int, cfg: HeadConfig) -> nn.Module:
    return FeatureStandardizer(dim, cfg.std_floor) if cfg.standardize else nn.Identity()


class GatedAttention(nn.Module):
    """Per-class attention scores: w(tanh(V x) * sigmoid(U x))."""

    def __init__(self, dim: int, attn_dim: int, n_classes: int, dropout: float):
        super().__init__()
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, n_classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(self.drop(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x))))


class GatedAttentionHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, cfg: HeadConfig):
        super().__init__()
        self.pre = _pre(dim, cfg)
        hidden = cfg.hidden or max(1, dim // 2)
        self.norm = nn.LayerNorm(dim)
        self.attn = GatedAttention(dim, cfg.attn_dim, n_classes, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, n_classes))
        self.scale = nn.Parameter(torch.ones(n_classes))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(self.pre(feats))
        seg = study_index(cu, len(x))
        a = segment_softmax(self.attn(x), seg, len(cu) - 1)
        tok = self.mlp(x)
        pooled = torch.zeros((len(cu) - 1, tok.shape[1]), dtype=tok.dtype, device=tok.device).index_add(0, seg, a * tok)
        return pooled * self.scale + self.bias, a


class ABMILHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, cfg: HeadConfig):
        super().__init__()
        self.pre = _pre(dim, cfg)
        self.norm = nn.LayerNorm(dim)
        self.attn = GatedAttention(dim, cfg.attn_dim, n_classes, cfg.dropout)
        self.weight = nn.Parameter(torch.zeros(n_classes, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n_classes))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(self.pre(feats))
        seg = study_index(cu, len(x))
        a = segment_softmax(self.attn(x), seg, len(cu) - 1)
        # per study: pooled [C, D] = a_b^T x_b, then one linear classifier per class
        out = []
        for b in range(len(cu) - 1):
            s, e = int(cu[b]), int(cu[b + 1])
            pooled = self.drop(a[s:e].T @ x[s:e])
            out.append((pooled * self.weight).sum(-1))
        return torch.stack(out) + self.bias, a


class MeanPoolHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, cfg: HeadConfig):
        super().__init__()
        self.pre = _pre(dim, cfg)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.pre(feats)
        seg = study_index(cu, len(feats))
        n = (cu[1:] - cu[:-1]).clamp(min=1).to(feats.dtype)  # an empty study gives bias-only logits, not NaN
        mean = torch.zeros((len(cu) - 1, feats.shape[1]), dtype=feats.dtype, device=feats.device).index_add(0, seg, feats)
        mean = mean / n[:, None]
        c = self.fc.out_features
        a = (1.0 / n)[seg][:, None].expand(-1, c)
        return self.fc(self.drop(self.norm(mean))), a


class TopKHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, cfg: HeadConfig):
        super().__init__()
        self.pre = _pre(dim, cfg)
        hidden = cfg.hidden or max(1, dim // 2)
        self.k = cfg.top_k
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, n_classes))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.mlp(self.norm(self.pre(feats)))  # [T, C] per-token logits
        a = torch.zeros_like(tok)
        out = []
        for b in range(len(cu) - 1):
            s, e = int(cu[b]), int(cu[b + 1])
            k = min(self.k, e - s)
            if k == 0:  # an empty study: bias-only logits
                out.append(tok.new_zeros(tok.shape[1]))
                continue
            top, idx = tok[s:e].topk(k, dim=0)  # [k, C]
            out.append(top.mean(0))
            a[s:e] = a[s:e].scatter(0, idx, 1.0 / k)
        return torch.stack(out) + self.bias, a


HEADS = {"gated": GatedAttentionHead, "abmil": ABMILHead, "mean": MeanPoolHead, "topk": TopKHead}


class HeadEnsemble(nn.Module):
    """Heads of one kind (trained with different seeds): the mean of their logits, and the mean of
    their attention, which still sums to one per class within each study."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one head")
        self.members = nn.ModuleList(members)

    def forward_members(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's logits [members, B, C] and the ensemble's attention (the members' mean)."""
        outs = [m(feats, cu) for m in self.members]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs]).mean(0)

    def forward(self, feats: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attn = self.forward_members(feats, cu)
        return logits.mean(0), attn


def build_head(cfg: HeadConfig, dim: int, n_classes: int) -> nn.Module:
    if cfg.ensemble > 1:
        return HeadEnsemble([HEADS[cfg.kind](dim, n_classes, cfg) for _ in range(cfg.ensemble)])
    return HEADS[cfg.kind](dim, n_classes, cfg)


def head_input_dim(head: nn.Module) -> int:
    """Token feature width a head reads."""
    if isinstance(head, HeadEnsemble):
        return head_input_dim(head.members[0])
    return int(head.norm.normalized_shape[0])


@torch.no_grad()
def token_contributions(head: nn.Module, feats: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """[T, C] each token's additive share of its study's logit: logit = bias + sum of its tokens'
    contributions, exactly, for every head kind (the head in eval mode).

    Attention says where a head looked; this says which tokens pushed the logit up, which is
    what a map of a finding should show. gated: scale * a * token logit; abmil: a * (w . x);
    topk: the token logit / k on each class's top-k tokens;
    mean: the LayerNorm of the mean is affine once its mean and spread are fixed, so each token
    carries (1/n) W (gamma * (x - mu) / sigma); an ensemble: the mean of its members'. With
    ``standardize`` every formula reads the standardised tokens (a per-token affine map, so the
    mean of standardised tokens is the standardised mean)."""
    if isinstance(head, HeadEnsemble):
        return torch.stack([token_contributions(m, feats, cu) for m in head.members]).mean(0)
    raw, feats = feats, head.pre(feats)  # standardisation is per token, so the decomposition holds
    if isinstance(head, GatedAttentionHead):
        x = head.norm(feats)
        seg = study_index(cu, len(x))
        a = segment_softmax(head.attn(x), seg, len(cu) - 1)
        return a * head.mlp(x) * head.scale
    if isinstance(head, ABMILHead):
        x = head.norm(feats)
        seg = study_index(cu, len(x))
        a = segment_softmax(head.attn(x), seg, len(cu) - 1)
        return a * (x @ head.weight.T)
    if isinstance(head, TopKHead):
        _, a = head(raw, cu)
        return a * head.mlp(head.norm(feats))
    if isinstance(head, MeanPoolHead):
        seg = study_index(cu, len(feats))
        n = (cu[1:] - cu[:-1]).clamp(min=1).to(feats.dtype)
        mean = torch.zeros((len(cu) - 1, feats.shape[1]), dtype=feats.dtype).index_add(0, seg, feats) / n[:, None]
        mu = mean.mean(-1, keepdim=True)
        sd = torch.sqrt(mean.var(-1, unbiased=False, keepdim=True) + head.norm.eps)
        z = (feats - mu[seg]) / sd[seg] * head.norm.weight / n[seg][:, None]
        return z @ head.fc.weight.T
    raise TypeError(f"no token decomposition for {type(head).__name__}")


def token_logits(head: nn.Module, feats: torch.Tensor) -> torch.Tensor | None:
    """[T, C] each token's own class logits, the quantity a token-level (lesion mask) target
    supervises: gated and topk: the token MLP; abmil: each class's classifier applied to the token
    alone. None for ``mean``, whose classifier reads the normalised mean of a study, not tokens;
    an ensemble: the mean of its members' (None when they have none)."""
    if isinstance(head, HeadEnsemble):
        per = [token_logits(m, feats) for m in head.members]
        return None if per[0] is None else torch.stack(per).mean(0)
    if isinstance(head, (GatedAttentionHead, TopKHead)):
        return head.mlp(head.norm(head.pre(feats)))
    if isinstance(head, ABMILHead):
        return head.norm(head.pre(feats)) @ head.weight.T + head.bias
    if isinstance(head, MeanPoolHead):
        return None
    raise TypeError(f"no token logits for {type(head).__name__}")


def contribution_bias(head: nn.Module) -> torch.Tensor:
    """[C] the part of every logit no token carries (see ``token_contributions``)."""
    if isinstance(head, HeadEnsemble):
        return torch.stack([contribution_bias(m) for m in head.members]).mean(0)
    if isinstance(head, MeanPoolHead):
        return head.fc.weight @ head.norm.bias + head.fc.bias
    return head.bias
