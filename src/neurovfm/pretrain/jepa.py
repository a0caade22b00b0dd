"""Vol-JEPA: a student encoder on context tokens, a predictor, and an EMA teacher on all tokens.

The student and predictor live in one module (``JEPA``) so DDP/FSDP wrap exactly the trained
parameters; the teacher is kept apart (no gradients), updated by ``ema_update`` after each
optimizer step. The loss is Smooth L1 between the predictions and the teacher's layer-normed
outputs at the target tokens, summed over tokens (mean over channels) and divided by the number
of target tokens summed over all ranks (``optim.target_norm: instance`` instead standardises each
channel over the tokens of its series, as data2vec does: ``series_standardise``; a series never
spans two ranks, so its statistics are local); multiplied by the world size so that DDP's
gradient average gives exactly the single-process gradient over the same tokens.

Optionally (``optim.var_cov`` > 0) a variance-covariance term on the student's context features
is added (``variance_covariance``): small tiny-ViT runs on a few hundred studies lose most of
their effective rank under the JEPA loss alone, and this term pushes every feature dimension to
keep a spread and the dimensions to stay uncorrelated. Under DDP/FSDP the term is computed once
over every rank's tokens (``gather_tokens``: an all-gather that carries gradients back), so a run
on N processes takes the same step as one process on the same tokens.

Optionally (``optim.intensity_target`` > 0) a linear head on the student's context features
predicts each context token's own intensity histogram (``token_histograms``: the token's voxels in
``optim.intensity_bins`` bins of its uint8 view), scored as the KL divergence from the histogram
to the head's softmax. Why: on this project's CPU-scale runs the reference loss keeps only ~10-20
of 192 dimensions and the frozen tokens end up carrying less of what separates a lesion token from
its neighbours than a per-token intensity histogram does (the histogram baseline beats the
encoder on CT). A label-free low-level target in the spirit of MaskFeat's hand-crafted targets,
here on the tokens the encoder sees, asks the features to keep that content. The head is not
part of the exported encoder.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from neurovfm.models.config import EncoderConfig, PredictorConfig
from neurovfm.models.encoder import Encoder
from neurovfm.models.packing import Packed
from neurovfm.models.predictor import Predictor
from neurovfm.pretrain.data import JEPABatch
from neurovfm.tokens.normalize import to_uint8


class JEPA(nn.Module):
    """Student encoder + predictor (+ the optional intensity head): the trained half of Vol-JEPA."""

    def __init__(self, enc_cfg: EncoderConfig, pred_cfg: PredictorConfig, intensity_bins: int = 0):
        super().__init__()
        self.student = Encoder(enc_cfg)
        self.predictor = Predictor(enc_cfg, pred_cfg)
        self.intensity_bins = intensity_bins
        if intensity_bins:
            self.intensity_head = nn.Linear(enc_cfg.width, intensity_bins)

    def forward(self, batch: JEPABatch, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(sum over target tokens of the channel-mean Smooth L1, predictions, the student's
        context features, and with an intensity head the sum over context tokens of the KL
        divergence from each token's histogram to the head's prediction, else None)."""
        p = batch.packed
        ctx = Packed(p.tokens[batch.ctx_idx], p.coords[batch.ctx_idx], batch.cu_ctx)
        z = self.student(ctx)
        pred = self.predictor(z, ctx.coords, batch.cu_ctx, p.coords[batch.tgt_idx], batch.cu_tgt)
        per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
        kl = None
        if self.intensity_bins:
            hist = token_histograms(ctx.tokens, batch.views, batch.cu_ctx, self.intensity_bins)
            logq = F.log_softmax(self.intensity_head(z).float(), dim=-1)
            kl = F.kl_div(logq, hist, reduction="sum")
        return per_token.sum(), pred, z, kl


def token_histograms(tokens: torch.Tensor, views: list[str], cu: list[int], bins: int) -> torch.Tensor:
    """Each token's voxels [N, T] (z-scored per view, as batches hold them) binned into ``bins``
    equal bins of the uint8 view they came from -> fractions [N, bins], the same bins as the
    ``histogram:BINS`` baseline (``probe.embed.HistogramFeaturizer``). Series ``i`` (rows
    ``cu[i]:cu[i+1]``) was normalised with the statistics of ``views[i]``."""
    if len(views) != len(cu) - 1:
        raise ValueError(f"token_histograms: {len(views)} views for {len(cu) - 1} series")
    if not 2 <= bins <= 256:
        raise ValueError(f"intensity bins must be in 2..256, not {bins}")
    with torch.no_grad():
        u8 = torch.cat([to_uint8(tokens[a:b], v) for v, a, b in zip(views, cu[:-1], cu[1:])])
        idx = (u8 * bins) >> 8
        out = torch.zeros(tokens.shape[0], bins, dtype=torch.float32, device=tokens.device)
        out.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        return out / tokens.shape[1]


# VICReg's ratio of its covariance weight to its variance weight (1 : 25)
COVARIANCE_SHARE = 0.04


def variance_covariance(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's regulariser over tokens ``z`` [N, D]: the mean hinge ``relu(1 - std)`` of each
    dimension plus ``COVARIANCE_SHARE`` times the sum of squared off-diagonal covariances / D.
    Zero for uncorrelated dimensions of unit or larger spread; large for collapsed features."""
    z = z.float()
    if z.shape[0] < 2:
        return z.sum() * 0.0
    zc = z - z.mean(0)
    std = torch.sqrt(zc.var(0) + eps)
    var_term = F.relu(1.0 - std).mean()
    cov = zc.T @ zc / (z.shape[0] - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return var_term + COVARIANCE_SHARE * off.pow(2).sum() / z.shape[1]


def make_teacher(student: Encoder) -> Encoder:
    t = copy.deepcopy(student)
    for q in t.parameters():
        q.requires_grad_(False)
    return t.eval()


# how teacher outputs become targets: per token over channels, or per channel over a series' tokens
TARGET_NORMS = ("layer", "instance")


def series_standardise(h: torch.Tensor, cu: list[int], eps: float = 1e-5) -> torch.Tensor:
    """Each channel of ``h`` [N, D] centred and scaled to unit variance over the tokens of its
    series (rows ``cu[i]:cu[i+1]``): instance normalisation of a packed batch.

    Why: with per-token layer norm a teacher whose tokens all point the same way makes the
    shared direction the easiest thing to predict, and the small tiny-ViT runs collapse onto a
    few such directions (effective rank ~10 of 192, predictor cosine 0.98). Standardised per
    series, what all of a series' tokens share is removed and every channel's variation across
    the head weighs the same in the loss, so the predictor has to say how tokens differ."""
    h = h.float()
    lengths = torch.diff(torch.as_tensor(cu, device=h.device))
    if (lengths < 1).any():
        raise ValueError("series_standardise: every series needs at least one token")
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=h.device), lengths)
    count = lengths.to(h.dtype).unsqueeze(1)
    mean = h.new_zeros(len(lengths), h.shape[1]).index_add_(0, seg, h) / count
    hc = h - mean[seg]
    var = h.new_zeros(len(lengths), h.shape[1]).index_add_(0, seg, hc * hc) / count
    return hc * torch.rsqrt(var[seg] + eps)


@torch.no_grad()
def teacher_targets(teacher: Encoder, batch: JEPABatch, norm: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised teacher outputs at the targets [N_tgt, D], raw outputs of all tokens [N, D]).
    ``norm``: "layer" (the reference: each token over its channels) or "instance" (each channel
    over the tokens of its series, statistics from all of the series' tokens, not only targets)."""
    h = teacher(batch.packed)
    if norm == "layer":
        hn = F.layer_norm(h.float(), (h.shape[-1],))
    elif norm == "instance":
        hn = series_standardise(h, batch.packed.cu)
    else:
        raise ValueError(f"target norm must be one of {TARGET_NORMS}, got {norm!r}")
    return hn[batch.tgt_idx], h


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (works on local
    shards under FSDP, since both are sharded the same way)."""
    for m in (teacher, student):  # FSDP keeps a root's parameters gathered after forward
        if hasattr(m, "reshard"):
            m.reshard()
    tp = [_local(p) for p in teacher.parameters()]
    sp = [_local(p.detach()) for p in student.parameters()]
    if len(tp) != len(sp):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_lerp_(tp, sp, 1.0 - momentum)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_count(n: int, device) -> int:
    """Number of target tokens summed over all ranks."""
    t = torch.tensor([n], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return int(t.item())


class _AllGatherRows(torch.autograd.Function):
    """[M, D] per rank -> [world, M, D] on every rank; the backward sums every rank's gradient
    for a rank's block into that rank (each rank used all blocks in the same term)."""

    @staticmethod
    def forward(ctx, zp: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(zp) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, zp.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def gather_tokens(z: torch.Tensor) -> torch.Tensor:
    """Rows of ``z`` [N_r, D] from every rank, concatenated in rank order, differentiable.

    Ranks hold different token counts, so each pads to the largest count before the all-gather
    and the padding is cut away after. Every rank then computes the same term over all tokens;
    its gradient for a rank's rows, summed over ranks and divided by DDP's average over the world,
    is exactly the gradient of that one term. One process: ``z`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    n = torch.tensor([z.shape[0]], dtype=torch.int64, device=z.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    pad = max(sizes) - z.shape[0]
    zp = torch.cat([z, z.new_zeros(pad, z.shape[1])]) if pad else z
    blocks = _AllGatherRows.apply(zp)
    return torch.cat([blocks[r, :k] for r, k in enumerate(sizes)])


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
