"""Health monitors for self-supervised pretraining (SPEC.md "failure signs to watch").

- collapse: the teacher's per-channel output std and the effective rank of its token
  embeddings (both fall when representations collapse), and the predictor-target cosine;
- modality shortcut: accuracy of a small linear probe telling CT from MRI from single token
  features (background is already removed, so this measures what the tokens carry, not air);
- attention on air and bone: the share of last-layer attention mass landing on mostly-air and
  mostly-bone tokens, against their share of tokens (a ratio above 1 means over-attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neurovfm.models.packing import Packed
from neurovfm.pretrain.data import KIND_AIR, KIND_BONE, JEPABatch


@torch.no_grad()
def output_std(h: torch.Tensor) -> float:
    return float(h.float().std(dim=0).mean()) if h.shape[0] > 1 else 0.0


@torch.no_grad()
def effective_rank(h: torch.Tensor, max_tokens: int = 2048, seed: int = 0) -> float:
    """exp(entropy) of the normalised singular values of centred token features."""
    h = h.float()
    if h.shape[0] > max_tokens:
        g = torch.Generator().manual_seed(seed)
        h = h[torch.randperm(h.shape[0], generator=g)[:max_tokens].to(h.device)]
    h = h - h.mean(0, keepdim=True)
    s = torch.linalg.svdvals(h)
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.cosine_similarity(pred.float(), target.float(), dim=-1).mean())


def modality_probe_accuracy(feats: torch.Tensor, is_ct: torch.Tensor, steps: int = 100, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (half train / half test, by series)."""
    if feats.shape[0] < 8 or is_ct.all() or not is_ct.any():
        return math.nan
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(feats.shape[0], generator=g)
    half = feats.shape[0] // 2
    tr, te = perm[:half], perm[half:]
    x = feats.float()
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    y = is_ct.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[tr] @ w + b, y[tr]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((((x[te] @ w + b) > 0).float() == y[te]).float().mean())


@torch.no_grad()
def attention_on_kinds(teacher, batch: JEPABatch, max_series: int = 2) -> dict[str, float]:
    """Last-layer attention mass on air / bone tokens and their token share, over a few series."""
    p = batch.packed
    order = sorted(range(p.n_series), key=lambda i: batch.modality[i] != "CT")[:max_series]
    # always exactly max_series forwards (a series repeats when there are fewer; the means are the
    # same): under FSDP every forward is a collective, so every rank must run the same number
    order = (order * max_series)[:max_series]
    att = {"air": 0.0, "bone": 0.0}
    share = {"air": 0.0, "bone": 0.0}
    n = 0
    for i in order:
        s, e = p.cu[i], p.cu[i + 1]
        sub = Packed(p.tokens[s:e], p.coords[s:e], [0, e - s])
        _, w = teacher(sub, attention_layers=[-1])
        a = w[0][0].mean(0).mean(0).float()  # mean over heads and queries -> [L]
        kinds = batch.kinds[s:e].to(a.device)
        for name, k in (("air", KIND_AIR), ("bone", KIND_BONE)):
            m = kinds == k
            att[name] += float(a[m].sum())
            share[name] += float(m.float().mean())
        n += 1
    if n == 0:
        return {}
    out = {}
    for name in ("air", "bone"):
        out[f"attn_{name}"] = att[name] / n
        out[f"tokens_{name}"] = share[name] / n
    return out
