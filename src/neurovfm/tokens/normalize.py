"""Token intensities as the model sees them: uint8 view / 255, z-scored per view.

The statistics are the reference's (SPEC.md section 2), so imported reference weights see the
inputs they were trained on. Every MRI sequence shares the MRI statistics.
"""

from __future__ import annotations

import numpy as np
import torch

VIEW_STATS: dict[str, tuple[float, float]] = {
    "mr": (0.3141, 0.2623),
    "brain": (0.4139, 0.4059),
    "blood": (0.3184, 0.3605),
    "bone": (0.2719, 0.1875),
}


def stats_for(view: str) -> tuple[float, float]:
    """Mean and std for a view name (CT window names, or anything else counts as MRI)."""
    return VIEW_STATS.get(view, VIEW_STATS["mr"])


def normalize(tokens_u8: np.ndarray | torch.Tensor, view: str) -> torch.Tensor:
    """uint8 tokens [..., T] -> float32 z-scored tensor."""
    t = torch.as_tensor(np.asarray(tokens_u8)) if not isinstance(tokens_u8, torch.Tensor) else tokens_u8
    mean, std = stats_for(view)
    return (t.to(torch.float32) / 255.0 - mean) / std


def to_uint8(tokens: torch.Tensor, view: str) -> torch.Tensor:
    """The inverse of ``normalize``: z-scored tokens -> the uint8 view levels they came from (int64,
    rounded, so float error never moves a level)."""
    mean, std = stats_for(view)
    return torch.round((tokens.float() * std + mean) * 255.0).clamp_(0, 255).long()


def view_of(modality: str, window: str | None) -> str:
    """The statistics key of a series view: the CT window name, or ``mr``."""
    return window if modality == "CT" and window else "mr"
