"""Process-group set-up shared by every torchrun entry point (pretraining, report training)."""
from __future__ import annotations

import gc
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

_joined = False  # this process joined a process group (a torchrun worker)


def init_distributed(want: str = "auto") -> tuple[int, int, torch.device]:
    """torchrun: join the process group (NCCL on GPUs, gloo on CPU); alone: rank 0 of 1.
    ``want`` is auto | cuda | cpu; returns (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and want in ("auto", "cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        global _joined
        _joined = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Every rank done before any tears down, then the process group goes. Wrapped models still
    alive hold gloo work objects; they are collected first so none outlives its group. After a
    failure pass ``wait_for_peers=False``: a barrier the other ranks never reach would hang, while
    leaving at once lets torchrun stop them."""
    if dist.is_initialized():
        gc.collect()
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def joined_process_group() -> bool:
    return _joined


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker without interpreter finalisation, as ``multiprocessing`` ends its
    children (flush, then ``os._exit``). Gloo's C++ threads can still hold work objects that own
    Python tensors; when the interpreter is torn down around them the process aborts with
    "terminate called without an active exception" although every result was written (seen in
    2-process CPU runs under load, after a clean barrier and destroy_process_group)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
