"""`neurovfm report-train`: teach the report VLM to write structured reports from frozen features.

Stage 1 trains the resampler and connector with the LLM frozen; stage 2 adds LoRA adapters
(or, with ``lora_r: 0``, unfreezes the whole LLM). Loss is on the answer tokens only. Steps
are batch-size-1 examples in a seeded order and token subsamples drawn from (seed, step), so a
run stopped anywhere and resumed from its checkpoint takes exactly the same steps. Checkpoints
and the final model hold only the resampler, connector and adapter, plus the base LLM's path
and checksum.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..distributed import init_distributed, shutdown_distributed
from ..errors import NeuroVFMError
from ..models.folder import make_provenance
from ..pretrain.checkpoint import (latest_checkpoint, load_checkpoint, load_optimizer, optimizer_tensors,
                                   save_checkpoint)
from .constrained import ReportGrammar
from .data import build_examples, finding_vocabulary, read_truth, series_features, target_report
from .folder import (FINGERPRINT_VERSION, build_vlm, llm_fingerprint, load_trainable_state, same_base,
                     save_report_model, trainable_state)
from .schema import ReportSchema


class ReportTrainError(NeuroVFMError):
    """A report-training configuration or state is invalid."""


@dataclass
class ReportTrainConfig:
    llm: str                                # local HF causal-LM folder (the base, never modified)
    features: str                           # `neurovfm embed` output
    findings: str                           # keyed findings_keyed.jsonl (`neurovfm rekey`)
    out: str
    use_images: bool = True                 # False: the indication-only comparison model
    use_indication: bool = True
    latents: int = 8                        # SPEC: 64 (GPU); fewer on CPU
    resampler_layers: int = 2               # SPEC: 6
    resampler_heads: int = 4                # SPEC: 8
    resampler_width: int | None = None      # default: the feature width
    stage1_steps: int = 160
    stage2_steps: int = 320
    lora_r: int = 8                         # 0: full fine-tuning in stage 2
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr_stage1: float = 1e-3
    lr_stage2: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_tokens_per_series: int = 512
    seed: int = 0
    checkpoint_every: int = 40
    keep_checkpoints: int = 2
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        if not self.use_images and self.stage1_steps:
            raise ReportTrainError("stage 1 trains only the image path; an indication-only model "
                                   "(use_images false) needs stage1_steps 0")
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps == 0:
            raise ReportTrainError("stage1_steps + stage2_steps must be > 0 (and neither negative)")
        if self.latents < 1 or self.max_tokens_per_series < 1:
            raise ReportTrainError("latents and max_tokens_per_series must be >= 1")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def model_cfg(self, feature_dim: int) -> dict[str, Any]:
        return {"resampler": {"width": self.resampler_width or feature_dim, "latents": self.latents,
                              "layers": self.resampler_layers, "heads": self.resampler_heads},
                "connector_hidden": None, "use_images": self.use_images,
                "use_indication": self.use_indication, "max_tokens_per_series": self.max_tokens_per_series}


def example_order(n: int, step: int, seed: int) -> int:
    """Index of the example used at a step: a fresh seeded permutation every epoch."""
    epoch, k = divmod(step, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[k])


def lr_at(cfg: ReportTrainConfig, step: int) -> float:
    stage2 = step >= cfg.stage1_steps
    base = cfg.lr_stage2 if stage2 else cfg.lr_stage1
    s0 = cfg.stage1_steps if stage2 else 0
    n = (cfg.stage2_steps if stage2 else cfg.stage1_steps)
    k = step - s0
    if k < cfg.warmup_steps:
        return base * (k + 1) / cfg.warmup_steps
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - cfg.warmup_steps) / max(1, n - cfg.warmup_steps))))


def _optimizer(vlm, cfg: ReportTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(vlm.trainable_parameters(), lr=cfg.lr_stage1, weight_decay=cfg.weight_decay)


def _enter_stage2(vlm, cfg: ReportTrainConfig) -> None:
    if cfg.lora_r > 0 and not vlm.has_lora:
        vlm.add_lora(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets, seed=cfg.seed)
    vlm.set_stage(2)


class _LossModule(torch.nn.Module):
    """The VLM's teacher-forced loss as a module call, so DistributedDataParallel can wrap it."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, feats, indication, answer_ids):
        return self.vlm.loss_on_ids(feats, indication, answer_ids)


def _wrap(vlm, world: int, device: torch.device, find_unused: bool):
    mod = _LossModule(vlm)
    if world == 1:
        return mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(mod, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def train_reports(cfg: ReportTrainConfig, max_steps: int | None = None,
                  progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; stops after max_steps more steps (a chunk) or at the end.
    Writes checkpoints under out/ and, at the end, the report model folder out/model.
    Under torchrun each of the `world` processes takes its own example per step and DDP averages
    the gradients (an effective batch of `world`); rank 0 writes. Runs with ``cfg.threads``
    intra-op threads and gives the caller's setting back after."""
    from ..probe.train import torch_threads

    with torch_threads(cfg.threads):
        return _train_reports(cfg, max_steps, progress)


def _train_reports(cfg: ReportTrainConfig, max_steps: int | None,
                   progress: Callable[[int, int, float], None] | None) -> dict[str, Any]:
    import torch.distributed as dist

    from ..probe.embed import FeatureStore

    rank, world, device = init_distributed("auto")
    examples = build_examples(cfg.findings, cfg.features, ("train",))
    store_meta = FeatureStore(cfg.features).meta
    dim = int(store_meta["dim"])
    schema = ReportSchema(finding_vocabulary(read_truth(cfg.findings)))
    llm_sha = llm_fingerprint(cfg.llm)
    torch.manual_seed(cfg.seed)
    vlm = build_vlm(cfg.llm, cfg.model_cfg(dim), dim)
    vlm.set_stage(1)
    grammar = ReportGrammar(schema, vlm.tokenizer)
    answers = [grammar.encode(target_report(e.truth, schema)) for e in examples]

    os.makedirs(cfg.out, exist_ok=True)
    step, log = 0, []
    ck = latest_checkpoint(cfg.out)
    opt = None
    if ck:
        tensors, meta = load_checkpoint(ck)
        if meta["config"] != _cfg_json(cfg):
            raise ReportTrainError(f"{ck}: written with another configuration; use a new --out")
        version = meta.get("llm_fingerprint", 1)  # absent: a checkpoint from before fingerprint version 2
        if not (meta["llm_sha256"] == llm_sha if version == FINGERPRINT_VERSION
                else same_base(cfg.llm, meta["llm_sha256"], version, ck)):  # llm_sha: not hashed twice
            raise ReportTrainError(f"{ck}: the base LLM changed since this run started")
        if int(meta.get("world_size", 1)) != world:
            raise ReportTrainError(f"{ck}: started with {meta.get('world_size', 1)} processes, now {world}; "
                                   "resume with the same number (a step's examples depend on it)")
        step, log = int(meta["step"]), meta["log"]
        if meta["stage"] == 2:
            _enter_stage2(vlm, cfg)
        load_trainable_state(vlm, tensors, ck)
        opt = _optimizer(vlm, cfg)
        load_optimizer(opt, tensors, meta["param_groups"])
    if opt is None:
        if cfg.stage1_steps == 0:
            _enter_stage2(vlm, cfg)
        opt = _optimizer(vlm, cfg)

    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, step + max_steps)
    vlm.to(device)
    opt_state_to(opt, device)
    vlm.train()
    model = _wrap(vlm, world, device, not cfg.use_images)
    t0 = time.time()

    def save(at: int) -> None:
        if rank != 0:
            return
        tensors = trainable_state(vlm)
        ot, groups = optimizer_tensors(opt.state_dict())
        tensors.update(ot)
        save_checkpoint(cfg.out, at, tensors, {"step": at, "config": _cfg_json(cfg), "llm_sha256": llm_sha,
                                               "llm_fingerprint": FINGERPRINT_VERSION, "param_groups": groups,
                                               "log": log, "stage": vlm.config.stage, "world_size": world},
                        cfg.keep_checkpoints)

    while step < end:
        if step >= cfg.stage1_steps and vlm.config.stage == 1:
            _enter_stage2(vlm, cfg)       # adapters added (B = 0: same outputs), fresh optimiser
            vlm.to(device)
            opt = _optimizer(vlm, cfg)
            model = _wrap(vlm, world, device, not cfg.use_images)
        k = step * world + rank           # this process's example of the step
        i = example_order(len(examples), k, cfg.seed)
        ex = examples[i]
        rng = np.random.default_rng([cfg.seed, k, 1])
        feats = [f.to(device) for f in series_features(ex, cfg.max_tokens_per_series, rng)] if cfg.use_images else []
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = model(feats, ex.indication if cfg.use_indication else None, answers[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(vlm.trainable_parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        lv = loss.detach()
        if world > 1:
            dist.all_reduce(lv)
            lv = lv / world
        log.append({"step": step, "loss": round(lv.item(), 5), "stage": vlm.config.stage})
        if progress and rank == 0:
            progress(step, cfg.total_steps, lv.item())
        if step % cfg.checkpoint_every == 0 or step == end:
            save(step)
    done = step >= cfg.total_steps
    if done and rank == 0:
        model_dir = os.path.join(cfg.out, "model")
        mcfg = cfg.model_cfg(dim)
        mcfg["finding_labels"] = sorted({f["label"] for e in examples for f in e.truth["findings"]})
        save_report_model(model_dir, vlm.to("cpu"), schema, mcfg, cfg.llm, llm_sha, dim,
                          store_meta.get("encoder_id"),
                          make_provenance({"train_studies": len(examples), "steps": cfg.total_steps,
                                           "config": _cfg_json(cfg)}))
    if world > 1:  # rank 0 has written everything before anyone returns
        shutdown_distributed()
    return {"step": step, "total_steps": cfg.total_steps, "done": done, "seconds": round(time.time() - t0, 1),
            "last_losses": [r["loss"] for r in log[-10:]], "n_train": len(examples),
            "model": os.path.join(cfg.out, "model") if done else None, "world_size": world, "rank": rank}


def opt_state_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


def _cfg_json(cfg: ReportTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["lora_targets"] = list(cfg.lora_targets)
    for k in ("out", "threads", "checkpoint_every", "keep_checkpoints"):   # where/how, not what
        d.pop(k)
    return json.loads(json.dumps(d))


def load_train_config(path: str, **overrides: Any) -> ReportTrainConfig:
    from ..files import read_yaml

    d = read_yaml(path, ReportTrainError)
    d.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(d) - set(ReportTrainConfig.__dataclass_fields__)
    if unknown:
        raise ReportTrainError(f"{path}: unknown keys {sorted(unknown)}")
    try:
        return ReportTrainConfig(**d)
    except TypeError as e:
        raise ReportTrainError(f"{path}: {e}") from None
