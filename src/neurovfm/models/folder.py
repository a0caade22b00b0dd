"""The model folder: the one on-disk format every stage writes and reads.

    MODEL/
      config.json        {"format": "neurovfm-model", "format_version": 1, "encoder": {...}, ...}
      encoder.safetensors
      provenance.json    code version and commit, data (cache hashes, splits), command, time
      (later stages add e.g. heads.safetensors, calibration, operating points, and keys in config.json)

Weights are safetensors only (nothing is ever unpickled), and every file is written to a
temporary name and renamed, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neurovfm.errors import NeuroVFMError
from neurovfm.models.config import EncoderConfig
from neurovfm.models.encoder import Encoder
from neurovfm.tokens.cache import atomic_write_text

FORMAT = "neurovfm-model"
FORMAT_VERSION = 1


class ModelFolderError(NeuroVFMError):
    """A model folder is missing, of another format or version, or its weights do not fit."""


def code_version() -> dict[str, str]:
    """Package version and, inside a git checkout, the commit (with a dirty flag)."""
    from neurovfm import __version__

    out = {"package": __version__}
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            out["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def make_provenance(data: dict[str, Any] | None = None, command: list[str] | None = None,
                    **extra: Any) -> dict[str, Any]:
    return {
        "code": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command if command is not None else sys.argv),
        "data": data or {},
        **extra,
    }


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tmp + fsync + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder}: not a model folder (no config.json)")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: unreadable config ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: format {cfg.get('format')!r} is not {FORMAT!r}")
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format version {cfg.get('format_version')} is newer than this code "
                               f"({FORMAT_VERSION}); upgrade neurovfm")
    return cfg


def update_config(folder: str, **sections: Any) -> dict[str, Any]:
    """Add or replace top-level sections of ``config.json`` (for later stages' parts)."""
    cfg = read_config(folder)
    cfg.update(sections)
    write_json(os.path.join(folder, "config.json"), cfg)
    return cfg


def save_encoder(encoder: Encoder, folder: str, provenance: dict[str, Any] | None = None,
                 extra_config: dict[str, Any] | None = None) -> str:
    """Write (or overwrite) the encoder part of a model folder."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, "encoder.safetensors"), encoder.state_dict(),
                 metadata={"format": FORMAT})
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": encoder.cfg.to_dict()}
    existing = os.path.join(folder, "config.json")
    if os.path.exists(existing):
        old = read_config(folder)
        old.update(cfg)
        cfg = old
    cfg.update(extra_config or {})
    write_json(os.path.join(folder, "config.json"), cfg)
    write_json(os.path.join(folder, "provenance.json"), provenance or make_provenance())
    return folder


def load_state(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: missing weights file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelFolderError(f"{path}: unreadable safetensors file ({e})") from None


def load_encoder(folder: str, map_location: str | torch.device = "cpu", **overrides: Any) -> Encoder:
    """Encoder from a model folder; ``overrides`` change runtime-only fields (attention, checkpointing)."""
    cfg = read_config(folder)
    if "encoder" not in cfg:
        raise ModelFolderError(f"{folder}: config.json has no encoder section")
    allowed = {"attention", "checkpoint_activations"}
    bad = set(overrides) - allowed
    if bad:
        raise ModelFolderError(f"only {sorted(allowed)} may be overridden at load time, not {sorted(bad)}")
    ecfg = EncoderConfig.from_dict({**cfg["encoder"], **overrides})
    enc = Encoder(ecfg)
    state = load_state(os.path.join(folder, "encoder.safetensors"))
    try:
        missing, unexpected = enc.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelFolderError(f"{folder}: weights do not fit the config ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: weights do not fit the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return enc.to(map_location)


def read_provenance(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "provenance.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)
