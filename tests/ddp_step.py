"""One Vol-JEPA step on the train series of a small cache, then the weights are saved.

Run alone (world 1, every series in one batch) or under ``torchrun --nproc_per_node 2`` (each
rank gets half of the series); the test compares the two. Usage: ddp_step.py CONFIG OUT
"""

import sys

import torch

from neurovfm.distributed import exit_worker, joined_process_group, shutdown_distributed
from neurovfm.models.folder import save_tensors
from neurovfm.pretrain.config import load_config
from neurovfm.pretrain.data import BatchLoader, select_studies
from neurovfm.pretrain.loop import Pretrainer

cfg = load_config(sys.argv[1])
out = sys.argv[2]
tr = Pretrainer(cfg, progress=False)
series = [s for st in select_studies(cfg.data, cfg.mask.min_tokens) for s in st.series]
mine = series[tr.rank::tr.world]
batch = BatchLoader(cfg.data, cfg.mask, cfg.run.seed).load(mine, epoch=0)
tr.wrapped.train()
rec = tr.train_step(batch)
grads = {f"grad.{k}": p.grad for k, p in tr.model.named_parameters() if p.grad is not None}
if tr.rank == 0:
    save_tensors(out, {**grads, **{f"w.{k}": v for k, v in tr.model.state_dict().items()},
                       "loss": torch.tensor([rec["loss"]], dtype=torch.float64),
                       **{k: torch.tensor([rec[k]], dtype=torch.float64) for k in ("var_cov", "intensity_kl") if k in rec}})
del tr, batch, grads  # the wrapped model goes before its process group
shutdown_distributed()
if joined_process_group():
    exit_worker(0)
