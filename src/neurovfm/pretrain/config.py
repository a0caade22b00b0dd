"""The pretraining configuration: one YAML file, typed and validated section by section.

    model:    encoder size + overrides, predictor
    mask:     masking scheme (pretrain/masks.py)
    data:     cache, splits, token budget, augmentation (pretrain/data.py)
    optim:    AdamW, warmup + cosine, EMA ramp, clipping
    run:      output folder, seed, epochs, checkpoint/log/monitor cadence, precision, distribution

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from neurovfm.errors import NeuroVFMError
from neurovfm.models.config import EncoderConfig, PredictorConfig, encoder_config
from neurovfm.pretrain.data import DataConfig
from neurovfm.pretrain.jepa import TARGET_NORMS
from neurovfm.pretrain.masks import MaskConfig


class ConfigError(NeuroVFMError):
    """A configuration file is unreadable or has unknown or invalid values."""


@dataclass(frozen=True)
class ModelSection:
    size: str = "small"
    encoder: dict = field(default_factory=dict)  # overrides of the named size
    predictor: dict = field(default_factory=lambda: {"width": 192, "depth": 4, "heads": 6})

    def encoder_config(self) -> EncoderConfig:
        return encoder_config(self.size, **self.encoder)

    def predictor_config(self) -> PredictorConfig:
        return PredictorConfig(**self.predictor)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3.75e-4  # peak
    start_lr: float = 1e-4
    final_lr: float = 1e-6
    warmup_frac: float = 0.10
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0
    ema: tuple[float, float] = (0.994, 1.0)
    # weight of a variance-covariance term (VICReg's, on the student's context features) added to
    # the JEPA loss against dimensional collapse; 0 = the reference's loss alone (pretrain/jepa.py)
    var_cov: float = 0.0
    # how the teacher's outputs become targets (pretrain/jepa.py): "layer" = each
    # token layer-normed over its channels (the reference); "instance" = each channel standardised
    # over the tokens of its series, so what every token shares carries no weight in the loss
    target_norm: str = "layer"
    # weight of a label-free auxiliary target (pretrain/jepa.py): a linear head on the student's
    # context features predicts each context token's own intensity histogram (intensity_bins bins
    # of its uint8 view), scored by KL divergence; 0 = the reference's loss alone
    intensity_target: float = 0.0
    intensity_bins: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_frac < 1:
            raise ValueError("warmup_frac must lie in [0, 1)")
        if not 0 < self.ema[0] <= self.ema[1] <= 1:
            raise ValueError(f"ema must satisfy 0 < start <= end <= 1, got {self.ema}")
        if min(self.lr, self.start_lr, self.final_lr) < 0:
            raise ValueError("learning rates must be non-negative")
        if self.var_cov < 0:
            raise ValueError(f"var_cov must be >= 0, got {self.var_cov}")
        if self.intensity_target < 0:
            raise ValueError(f"intensity_target must be >= 0, got {self.intensity_target}")
        if not 2 <= self.intensity_bins <= 256:
            raise ValueError(f"intensity_bins must be in 2..256, got {self.intensity_bins}")
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {self.target_norm!r}")


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/pretrain"
    seed: int = 0
    epochs: int = 10
    log_every: int = 1
    monitor_every: int = 25
    checkpoint_every: int = 50  # steps; also at the end of every chunk and epoch
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 autocast on CUDA if supported) | bf16 | fp32
    compile: bool = False
    deterministic: bool = False
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True
    collapse_std: float = 0.05  # warn when teacher output std falls below this share of its first value
    collapse_rank: float = 0.25  # ... or the effective rank below this share

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if min(self.epochs, self.log_every, self.monitor_every, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("epochs and cadences must be at least 1")


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init_from: str = ""  # a model folder (student-only) or a training checkpoint to start from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, d: Any, where: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    kw = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(d: dict[str, Any], where: str = "config") -> PretrainConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    sections = {"model": ModelSection, "mask": MaskConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}
    unknown = sorted(set(d) - set(sections) - {"init_from"})
    if unknown:
        raise ConfigError(f"{where}: unknown sections {unknown}")
    built = {k: _build(cls, d.get(k), f"{where}: {k}") for k, cls in sections.items()}
    model = built["model"]
    if isinstance(model.encoder, tuple) or isinstance(model.predictor, tuple):
        raise ConfigError(f"{where}: model.encoder and model.predictor must be mappings")
    try:
        model.encoder_config()
        model.predictor_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    return PretrainConfig(init_from=str(d.get("init_from") or ""), **built)


def load_config(path: str, overrides: list[str] | None = None) -> PretrainConfig:
    """YAML file (+ ``section.key=value`` overrides) -> validated config. Paths may use
    ``$VARS``; relative paths are relative to the working directory."""
    from neurovfm.files import read_yaml

    d = read_yaml(path, ConfigError)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not section.key=value")
        key, val = ov.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    for sec, key in (("data", "cache"), ("data", "splits_csv"), ("run", "out")):
        v = (d.get(sec) or {}).get(key)
        if isinstance(v, str):
            d[sec][key] = os.path.expandvars(v)
    if isinstance(d.get("init_from"), str):
        d["init_from"] = os.path.expandvars(d["init_from"])
    return config_from_dict(d, path)
