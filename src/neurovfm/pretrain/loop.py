"""The pretraining loop: one process, or many under ``torchrun`` (DDP, or FSDP by config).

    neurovfm pretrain CONFIG [--resume] [--max-steps N]
    torchrun --nproc_per_node 2 -m neurovfm pretrain CONFIG

Every random choice is keyed by (seed, epoch, series) or saved in the checkpoint, so a run
stopped at any step and resumed with ``--resume`` continues with the same batches, masks and
weights (bitwise on CPU with ``run.deterministic``). ``--max-steps`` ends a chunk early with a
checkpoint, for long runs done in resumable pieces.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from neurovfm.distributed import init_distributed as _init_distributed
from neurovfm.models.folder import make_provenance, save_encoder
from neurovfm.pretrain import monitors
from neurovfm.pretrain.checkpoint import (CheckpointError, is_checkpoint, latest_checkpoint, load_checkpoint,
                                          load_optimizer, optimizer_tensors, rng_state, save_checkpoint,
                                          set_rng_state, sub_state)
from neurovfm.pretrain.config import PretrainConfig
from neurovfm.pretrain.data import BatchLoader, epoch_iterator, plan_epoch, select_studies
from neurovfm.pretrain.jepa import (JEPA, ema_update, gather_tokens, global_count, make_teacher, teacher_targets,
                                   variance_covariance)
from neurovfm.tokens.cache import TokenCache, schema_hash

CSV_FIELDS = ["step", "epoch", "batch", "loss", "lr", "momentum", "grad_norm", "tokens", "targets",
              "tokens_per_s", "teacher_std", "erank", "cosine", "ct_mr_probe_acc", "attn_air", "tokens_air",
              "attn_bone", "tokens_bone", "var_cov", "intensity_kl"]


class CollapseWarning(UserWarning):
    """Representations look like they are collapsing (std or effective rank falling)."""


# -- schedules ---------------------------------------------------------------------------------
def lr_at(step: int, total: int, o) -> float:
    warm = int(o.warmup_frac * total)
    if step < warm:
        return o.start_lr + (o.lr - o.start_lr) * step / max(1, warm)
    t = (step - warm) / max(1, total - warm)
    return o.final_lr + 0.5 * (o.lr - o.final_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def momentum_at(step: int, total: int, o) -> float:
    return o.ema[0] + (o.ema[1] - o.ema[0]) * min(1.0, step / max(1, total))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on norms, biases and the mask token (position codes have no parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- distribution --------------------------------------------------------------------------------
def init_distributed(cfg: PretrainConfig) -> tuple[int, int, torch.device]:
    try:
        return _init_distributed(cfg.run.device)
    except RuntimeError as e:
        raise RuntimeError(f"run.device: {e}") from None


def autocast(cfg: PretrainConfig, device: torch.device):
    p = cfg.run.precision
    if p == "auto":
        use = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use = p == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _wrap(model: JEPA, teacher: nn.Module, cfg: PretrainConfig, world: int, device: torch.device):
    if world == 1:
        return model
    if cfg.run.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in (model, teacher):
            for enc in [m.student] if m is model else [m]:
                for blk in enc.blocks:
                    fully_shard(blk)
            if m is model:
                for blk in m.predictor.stack.blocks:
                    fully_shard(blk)
            fully_shard(m)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


# -- the run -------------------------------------------------------------------------------------
class Pretrainer:
    def __init__(self, cfg: PretrainConfig, resume: bool = False, progress: bool = True, command: list[str] | None = None):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg)
        self.progress = progress and self.rank == 0
        self.command = command
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        # Set the intra-op thread count explicitly even when unchanged: with torch 2.13 on CPU a run
        # in a process that had called set_num_threads (even to the same count) drifted in the last
        # bit of Adam's moments from one in a fresh process (found by the killed-and-resumed test
        # after another test had set threads), so an exact resume depended on what ran before it.
        # Every run now starts from the explicit state.
        torch.set_num_threads(torch.get_num_threads())
        torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
        self.studies = select_studies(cfg.data, cfg.mask.min_tokens)
        self.plans_len = [len(self._plan(e)[self.rank]) for e in range(cfg.run.epochs)]
        if min(self.plans_len) == 0:
            raise CheckpointError("an epoch has no batches for some rank: too few studies for this world size")
        self.total = sum(self.plans_len)
        enc_cfg = cfg.model.encoder_config()
        bins = cfg.optim.intensity_bins if cfg.optim.intensity_target > 0 else 0
        self.model = JEPA(enc_cfg, cfg.model.predictor_config(), intensity_bins=bins).to(self.device)
        self.teacher = make_teacher(self.model.student).to(self.device)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.baseline: dict[str, float] = {}
        if cfg.init_from:
            self._init_from(cfg.init_from)
        resumed = self._resume() if resume else None
        if cfg.run.compile:  # block by block: packed shapes vary, blocks are the hot, static part
            for stack in (self.model.student, self.model.predictor.stack, self.teacher):
                for blk in stack.blocks:
                    blk.compile(dynamic=True)
        self.fsdp = self.world > 1 and cfg.run.distributed == "fsdp"
        self.wrapped = _wrap(self.model, self.teacher, cfg, self.world, self.device)
        # the optimiser is built after wrapping: FSDP replaces parameters by sharded ones
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.start_lr,
                                     betas=cfg.optim.betas)
        if resumed is not None:
            self._load_optimizer(*resumed)
        self.loader = BatchLoader(cfg.data, cfg.mask, cfg.run.seed)
        self._probe_feats: list[torch.Tensor] = []
        self._probe_ct: list[torch.Tensor] = []
        os.makedirs(cfg.run.out, exist_ok=True)

    def _plan(self, epoch: int):
        d = self.cfg.data
        return plan_epoch(self.studies, self.cfg.run.seed, epoch, self.world, d.tokens_per_batch, d.max_tokens_per_series)

    # -- starting points ------------------------------------------------------------------------
    def _init_from(self, path: str) -> None:
        """A training checkpoint (student, predictor, teacher) or a student-only model folder
        (teacher copied from the student, fresh predictor)."""
        if is_checkpoint(path):
            tensors, _ = load_checkpoint(path)
            self.model.student.load_state_dict(sub_state(tensors, "student"))
            self.model.predictor.load_state_dict(sub_state(tensors, "predictor"))
            self.teacher.load_state_dict(sub_state(tensors, "teacher"))
        else:
            from neurovfm.models.folder import load_encoder

            enc = load_encoder(path)
            if enc.cfg.to_dict() | {"attention": "auto", "checkpoint_activations": False} != \
                    self.model.student.cfg.to_dict() | {"attention": "auto", "checkpoint_activations": False}:
                raise CheckpointError(f"{path}: its encoder config differs from model.* of this run")
            self.model.student.load_state_dict(enc.state_dict())
            self.teacher.load_state_dict(enc.state_dict())

    def _resume(self):
        path = latest_checkpoint(self.cfg.run.out)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.cfg.run.out}/checkpoints")
        tensors, meta = load_checkpoint(path)
        saved = meta["config"]
        now = self.cfg.to_dict()
        for sec in ("model", "mask", "optim"):
            # a setting added after the checkpoint was written counts as its default there
            defaults = dataclasses.asdict(getattr(PretrainConfig(), sec))
            if _norm({k: v for k, v in defaults.items() if k not in saved[sec]} | saved[sec]) != _norm(now[sec]):
                raise CheckpointError(f"{path}: config section {sec!r} changed since the checkpoint; "
                                      "resume needs the same model, mask and optimiser settings")
        if saved["run"]["seed"] != now["run"]["seed"] or saved["run"]["epochs"] != now["run"]["epochs"]:
            raise CheckpointError(f"{path}: run.seed / run.epochs changed since the checkpoint")
        self.model.student.load_state_dict(sub_state(tensors, "student"))
        self.model.predictor.load_state_dict(sub_state(tensors, "predictor"))
        self.teacher.load_state_dict(sub_state(tensors, "teacher"))
        set_rng_state(tensors, meta["rng"])
        self.step, self.epoch, self.batch_pos = meta["step"], meta["epoch"], meta["batch"]
        self.baseline = meta.get("baseline", {})
        return {k: v for k, v in tensors.items() if k.startswith("optim|")}, meta["param_groups"]

    def _load_optimizer(self, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
        tensors = {k: v.to(self.device) if not k.endswith("|step") else v for k, v in tensors.items()}
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                _, fqn, name = k.split("|", 2)
                state.setdefault(fqn, {})[name] = v
            set_optimizer_state_dict(self.model, self.opt, {"state": state, "param_groups": groups},
                                     options=StateDictOptions(full_state_dict=True))
        else:
            load_optimizer(self.opt, tensors, groups)

    # -- checkpoints ------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            teacher_sd = get_model_state_dict(self.teacher, options=opts)
        else:
            model_sd, teacher_sd = self.model.state_dict(), self.teacher.state_dict()
        t = dict(model_sd)
        t.update({f"teacher.{k}": v for k, v in teacher_sd.items()})
        return t

    def save(self) -> str | None:
        tensors = self._state()
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            osd = get_optimizer_state_dict(self.model, self.opt,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank != 0:  # the full state is gathered on rank 0 only
                return None
            otens, groups = optimizer_tensors(osd)
        else:
            if self.rank != 0:
                return None
            otens, groups = optimizer_tensors(self.opt.state_dict())
        rt, rmeta = rng_state()
        tensors.update(otens)
        tensors.update(rt)
        meta = {"step": self.step, "epoch": self.epoch, "batch": self.batch_pos, "config": self.cfg.to_dict(),
                "param_groups": [{k: v for k, v in g.items()} for g in groups], "rng": rmeta,
                "baseline": self.baseline, "world_size": self.world, "total_steps": self.total}
        return save_checkpoint(self.cfg.run.out, self.step, tensors, meta, self.cfg.run.keep_checkpoints)

    def export(self) -> str | None:
        """The teacher encoder as a model folder (``OUT/model``), with provenance."""
        state = self._state()  # collective under FSDP: every rank takes part
        if self.rank != 0:
            return None
        from neurovfm.models.encoder import Encoder

        enc = Encoder(self.cfg.model.encoder_config())
        enc.load_state_dict(sub_state(state, "teacher"))
        cache = TokenCache(self.cfg.data.cache)
        try:
            data = {"cache_schema_hash": schema_hash(), "policy_hash": cache.policy_hash,
                    "splits": list(self.cfg.data.splits), "splits_csv": os.path.basename(self.cfg.data.splits_csv),
                    "studies": len(self.studies), "series": sum(len(s.series) for s in self.studies)}
        finally:
            cache.close()
        prov = make_provenance(data=data, command=self.command, training={
            "steps": self.step, "epochs_done": self.epoch, "world_size": self.world,
            "config": self.cfg.to_dict(), "weights": "EMA teacher"})
        return save_encoder(enc, os.path.join(self.cfg.run.out, "model"), prov)

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, float]:
        cfg = self.cfg
        batch.packed = batch.packed.to(self.device)
        batch.ctx_idx, batch.tgt_idx = batch.ctx_idx.to(self.device), batch.tgt_idx.to(self.device)
        lr = lr_at(self.step, self.total, cfg.optim)
        m = momentum_at(self.step, self.total, cfg.optim)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with autocast(cfg, self.device):
            target, h = teacher_targets(self.teacher, batch, cfg.optim.target_norm)
        n_global = global_count(int(target.shape[0]), self.device)
        with autocast(cfg, self.device):
            loss_sum, pred, z, kl_sum = self.wrapped(batch, target)
        loss = loss_sum * (self.world / n_global)
        reg = variance_covariance(gather_tokens(z)) if cfg.optim.var_cov > 0 else None
        if reg is not None:
            loss = loss + cfg.optim.var_cov * reg
        if kl_sum is not None:  # a mean over every rank's context tokens, as the JEPA loss over targets
            n_ctx = global_count(int(batch.ctx_idx.numel()), self.device)
            loss = loss + cfg.optim.intensity_target * kl_sum * (self.world / n_ctx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        self.opt.step()
        ema_update(self.teacher, self.model.student, m)
        report = loss_sum.detach().double()
        if self.world > 1:
            dist.all_reduce(report)
        out = {"loss": float(report) / n_global, "lr": lr, "momentum": m, "grad_norm": float(gn),
               "tokens": batch.n_tokens, "targets": int(target.shape[0])}
        if reg is not None:
            out["var_cov"] = float(reg.detach())
        if kl_sum is not None:
            kl_report = kl_sum.detach().double()
            if self.world > 1:
                dist.all_reduce(kl_report)
            out["intensity_kl"] = float(kl_report) / n_ctx
        self._collect_probe(h, batch)
        fsdp = self.world > 1 and cfg.run.distributed == "fsdp"  # teacher forwards are collective there
        if (self.step + 1) % cfg.run.monitor_every == 0 and (self.rank == 0 or fsdp):
            mon = self._monitor(h, pred, target, batch)
            if self.rank == 0:
                out.update(mon)
        return out

    def _collect_probe(self, h: torch.Tensor, batch) -> None:
        g = torch.Generator().manual_seed(self.step)
        for i in range(batch.packed.n_series):
            s, e = batch.packed.cu[i], batch.packed.cu[i + 1]
            take = torch.randperm(e - s, generator=g)[:16] + s
            self._probe_feats.append(h[take.to(h.device)].float().cpu())
            self._probe_ct.append(torch.full((len(take),), batch.modality[i] == "CT"))

    def _monitor(self, h, pred, target, batch) -> dict[str, float]:
        out = {"teacher_std": monitors.output_std(h), "erank": monitors.effective_rank(h, seed=self.step),
               "cosine": monitors.cosine(pred, target)}
        feats, ct = torch.cat(self._probe_feats), torch.cat(self._probe_ct)
        out["ct_mr_probe_acc"] = monitors.modality_probe_accuracy(feats, ct, seed=self.step)
        self._probe_feats, self._probe_ct = [], []
        out.update(monitors.attention_on_kinds(self.teacher, batch))
        if not self.baseline:
            self.baseline = {"teacher_std": out["teacher_std"], "erank": out["erank"]}
        elif self.rank == 0 and (out["teacher_std"] < self.cfg.run.collapse_std * self.baseline["teacher_std"]
              or out["erank"] < self.cfg.run.collapse_rank * self.baseline["erank"]):
            warnings.warn(f"step {self.step + 1}: possible collapse (teacher std {out['teacher_std']:.4g} vs "
                          f"{self.baseline['teacher_std']:.4g} at start, effective rank {out['erank']:.1f} vs "
                          f"{self.baseline['erank']:.1f})", CollapseWarning, stacklevel=2)
        return out

    # -- the loop --------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        log = _Log(cfg, self.rank, self.step)
        stop_at = self.total if max_steps is None else min(self.total, self.step + max_steps)
        bar = tqdm(total=self.total, initial=self.step, disable=not self.progress, desc="pretrain", unit="step")
        last: dict[str, float] = {}
        saved = -1
        t0 = time.perf_counter()
        while self.step < stop_at and self.epoch < cfg.run.epochs:
            batches = self._plan(self.epoch)[self.rank]
            for i, batch in epoch_iterator(self.loader, batches, self.epoch, self.batch_pos, cfg.data.workers):
                self.wrapped.train()
                rec = self.train_step(batch)
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.step += 1
                self.batch_pos = i + 1
                if self.batch_pos >= len(batches):
                    self.epoch, self.batch_pos = self.epoch + 1, 0
                rec.update(step=self.step, epoch=self.epoch, batch=self.batch_pos,
                           tokens_per_s=rec["tokens"] * self.world / max(dt, 1e-9))
                last = rec
                if self.step % cfg.run.log_every == 0 or "teacher_std" in rec:
                    log.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                if self.step % cfg.run.checkpoint_every == 0 or self.step >= stop_at:
                    self.save()
                    saved = self.step
                if self.step >= stop_at:
                    break
            else:
                continue
            break
        bar.close()
        log.close()
        ckpt = self.save() if saved != self.step else latest_checkpoint(cfg.run.out)
        model_dir = self.export() if self.step >= self.total else None
        return {"step": self.step, "total": self.total, "epoch": self.epoch, "last": last,
                "checkpoint": ckpt, "model": model_dir}


def _norm(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _norm(v) for k, v in d.items() if k not in ("attention", "checkpoint_activations")}
    if isinstance(d, (list, tuple)):
        return [_norm(v) for v in d]
    return d


class _Log:
    """metrics.csv (rows past the resumed step are dropped, so a resumed log reads as one run)
    and TensorBoard when installed."""

    def __init__(self, cfg: PretrainConfig, rank: int, step: int):
        self.active = rank == 0
        self.path = os.path.join(cfg.run.out, "metrics.csv")
        self.tb = None
        if not self.active:
            return
        rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        self.fh = open(self.path, "w", newline="")
        self.w = csv.DictWriter(self.fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.w.writeheader()
        self.w.writerows(rows)
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(cfg.run.out, "tb"), purge_step=step + 1)
            except ImportError:
                self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if not self.active:
            return
        self.w.writerow(rec)
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch", "batch") and isinstance(v, (int, float)) and not math.isnan(v):
                    self.tb.add_scalar(f"pretrain/{k}", v, rec["step"])

    def close(self) -> None:
        if self.active:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def pretrain(cfg: PretrainConfig, resume: bool = False, max_steps: int | None = None, progress: bool = True,
             command: list[str] | None = None) -> dict[str, Any]:
    trainer = Pretrainer(cfg, resume=resume, progress=progress, command=command)
    res = trainer.run(max_steps)
    if dist.is_initialized():  # no barrier after a failure: peers would wait for this rank forever
        dist.barrier()
    return res
