"""Training checkpoints: everything needed to continue exactly, and nothing unpickled.

    OUT/checkpoints/step_00000120/
        state.safetensors   student.*, predictor.*, teacher.*, optim|<param>|<name>, rng.*
        state.json          step, data position (epoch, next batch), config, optimizer groups,
                            numpy / python RNG states, monitor baselines
    OUT/checkpoints/latest  name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, then
``latest`` is replaced atomically: a crash at any point leaves the previous checkpoint valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from neurovfm.errors import NeuroVFMError
from neurovfm.models.folder import load_state, save_tensors
from neurovfm.tokens.cache import _fsync_dir, atomic_write_text


class CheckpointError(NeuroVFMError):
    """A checkpoint is missing, incomplete or does not fit the model being trained."""


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": _np_state()}
    return tensors, meta


def _np_state() -> dict[str, Any]:
    s = np.random.get_state()
    return {"name": s[0], "keys": s[1].tolist(), "pos": int(s[2]), "has_gauss": int(s[3]), "gauss": float(s[4])}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimiser state dict (parameters keyed by index, or by name under FSDP) as flat tensors."""
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"optim|{pid}|{name}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim|"):
            _, pid, name = k.split("|", 2)
            state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> str:
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_tensors(os.path.join(tmp, "state.safetensors"), tensors)
    atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(meta, indent=1, sort_keys=True, default=_jsonable))
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    _prune(root, keep, name)
    return final


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _prune(root: str, keep: int, newest: str) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))
    for d in done[:-keep]:
        if d != newest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    for d in os.listdir(root):  # temporaries of crashed writers
        if d.startswith(".step_") and ".tmp" in d:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(out: str) -> str | None:
    root = os.path.join(out, "checkpoints")
    p = os.path.join(root, "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise CheckpointError(f"{p} names {name}, which is incomplete or missing")
    return path


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "state.safetensors"))


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint (needs state.json and state.safetensors)")
    with open(os.path.join(path, "state.json")) as fh:
        meta = json.load(fh)
    return load_state(os.path.join(path, "state.safetensors")), meta


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
