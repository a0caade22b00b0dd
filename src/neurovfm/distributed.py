"""Process-group set-up shared by every torchrun entry point (pretraining, report training)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(want: str = "auto") -> tuple[int, int, torch.device]:
    """torchrun: join the process group (NCCL on GPUs, gloo on CPU); alone: rank 0 of 1.
    ``want`` is auto | cuda | cpu; returns (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and want in ("auto", "cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")
