"""Fitting a study-level head on frozen features: multi-label BCE with per-label positive
weights (class imbalance), unknown labels (NaN) masked out, AdamW, and model selection and early
stopping on the *validation* macro AUROC only. Heads are saved into the model folder
(``<name>.safetensors`` + a ``heads`` section in ``config.json``), never pickled.

Where some training studies have lesion masks (``probe.token_targets``), a token term joins the
study loss with weight ``token_weight`` (see :func:`token_loss`): the head's own token logits
learn lesion vs other tokens, and its attention learns to put a positive study's mass on the
lesion. Studies without masks train on their labels alone; model selection stays on validation
study labels.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from neurovfm.eval.metrics import auroc
from neurovfm.models.folder import (FORMAT, FORMAT_VERSION, ModelFolderError, load_state, read_config, save_tensors,
                                    update_config, write_json)
from neurovfm.probe.heads import HeadConfig, HeadEnsemble, build_head, head_input_dim, study_index, token_logits


TOKEN_BALANCES = ("pooled", "per_class")


@dataclass
class HeadTrainConfig:
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8  # studies per step
    max_tokens: int = 2048  # random tokens per study per step (all tokens at evaluation)
    patience: int = 10  # epochs without a better validation macro AUROC
    pos_weight_max: float = 50.0
    seed: int = 0
    threads: int = 1  # heads are small: one intra-op thread is fastest, and by far on a busy CPU
    token_weight: float = 1.0  # weight of the token term when lesion masks are given (token_targets)
    token_balance: str = "pooled"  # token BCE halves: over all classes' tokens (pooled) or per class

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_tokens < 1:
            raise ValueError("epochs, batch_size and max_tokens must be positive")
        if not self.token_weight >= 0:
            raise ValueError(f"token_weight must be >= 0, not {self.token_weight}")
        if self.token_balance not in TOKEN_BALANCES:
            raise ValueError(f"token_balance must be one of {', '.join(TOKEN_BALANCES)}, not {self.token_balance!r}")


Bag = np.ndarray | torch.Tensor


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` intra-op threads, restoring the caller's setting after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _pack(bags: Sequence[Bag], idx: Sequence[int], max_tokens: int | None,
          g: torch.Generator | None, rows: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Studies ``idx`` packed [T, D] with offsets; at most ``max_tokens`` random tokens each.
    ``rows``: if a list, each study's kept token rows are appended to it (None = all)."""
    parts = []
    for i in idx:
        b = torch.as_tensor(np.asarray(bags[i]), dtype=torch.float32) if not isinstance(bags[i], torch.Tensor) \
            else bags[i].float()
        keep = None
        if max_tokens is not None and len(b) > max_tokens:
            keep = torch.randperm(len(b), generator=g)[:max_tokens].sort().values
            b = b[keep]
        if rows is not None:
            rows.append(keep)
        parts.append(b)
    cu = torch.tensor([0] + np.cumsum([len(p) for p in parts]).tolist())
    return torch.cat(parts), cu


def _pack_targets(targets: Sequence[np.ndarray | None], idx: Sequence[int], rows: list, cu: torch.Tensor,
                  n_classes: int) -> torch.Tensor:
    """[T, C] the token targets of studies ``idx``, the same rows :func:`_pack` kept (a study
    without masks: all False; :func:`trusted_pairs` keeps it out of the token term anyway)."""
    parts = []
    for k, (i, r) in enumerate(zip(idx, rows)):
        t = targets[i]
        if t is None:
            parts.append(torch.zeros((int(cu[k + 1] - cu[k]), n_classes), dtype=torch.bool))
        else:
            t = torch.as_tensor(np.asarray(t, bool))
            parts.append(t if r is None else t[r])
    return torch.cat(parts)


def token_loss(head: torch.nn.Module, x: torch.Tensor, cu: torch.Tensor, attn: torch.Tensor, lesion: torch.Tensor,
               trusted: torch.Tensor, balance: str = "pooled") -> torch.Tensor:
    """The token term for one packed batch. ``lesion [T, C]``: token t lies in a lesion of class
    c; ``trusted [B, C]``: study b's token truth for class c is usable (it has masks, the label is
    known, and a positive label has lesion tokens somewhere in the study).

    * token logits (gated, topk, abmil; :func:`heads.token_logits`): BCE of lesion vs other
      tokens of trusted (study, class) pairs, positives and negatives weighted half each (lesion
      tokens are a few per cent). ``balance="pooled"``: each half is the mean over all classes'
      tokens, so classes with large lesions (ventriculomegaly) carry most of the lesion half;
      ``"per_class"``: each half is the mean over classes of that class's own mean, so a small
      lesion's class weighs as much as a large one's;
    * attention (heads whose attention is learned: gated, abmil): for every trusted positive pair
      with lesion tokens in the batch, -log of the attention mass on them.
    """
    seg = study_index(cu, len(x))
    ok = trusted[seg]  # [T, C]
    lesion = lesion & ok
    terms = []
    tl = token_logits(head, x)
    if tl is not None:
        bce = F.binary_cross_entropy_with_logits(tl, lesion.float(), reduction="none")
        other = ok & ~lesion
        for part in (lesion, other):
            if not part.any():
                continue
            if balance == "per_class":
                n = part.sum(0)
                per = (bce * part).sum(0)[n > 0] / n[n > 0]
                terms.append(0.5 * per.mean())
            else:
                terms.append(0.5 * bce[part].mean())
    if attn.requires_grad:
        b = len(cu) - 1
        mass = torch.zeros((b, attn.shape[1]), dtype=attn.dtype).index_add(0, seg, attn * lesion)
        has = torch.zeros((b, attn.shape[1]), dtype=attn.dtype).index_add(0, seg, lesion.to(attn.dtype)) > 0
        if has.any():
            terms.append(-torch.log(mass[has] + 1e-6).mean())
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def trusted_pairs(targets: Sequence[np.ndarray | None], y: np.ndarray) -> np.ndarray:
    """[N, C] which (study, class) pairs the token term may use: the study has masks, its label
    is known, and a positive label's lesion lies on some token (a finding without a mask, or a
    lesion outside every token, says nothing about which tokens show it)."""
    out = np.zeros(y.shape, bool)
    for i, t in enumerate(targets):
        if t is None:
            continue
        if t.shape[1] != y.shape[1]:
            raise ValueError(f"token targets of study {i} have {t.shape[1]} classes, labels {y.shape[1]}")
        known = ~np.isnan(y[i])
        out[i] = known & ((np.nan_to_num(y[i]) == 0) | t.any(0))
    return out


def val_macro_auroc(y: np.ndarray, logits: np.ndarray) -> float:
    """Macro AUROC over labels with both classes on validation (NaN if none)."""
    vals = [auroc(y[:, j], logits[:, j]) for j in range(y.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


@torch.no_grad()
def predict(head: torch.nn.Module, bags: Sequence[Bag], batch_size: int = 8,
            threads: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [N, C] and each study's attention [n_tokens, C], using every token."""
    with torch_threads(threads):
        return _predict(head, bags, batch_size)


def _batches(bags: Sequence[Bag], batch_size: int):
    """(number of studies, packed tokens, cumulative token offsets) for consecutive batches, every token kept."""
    for s in range(0, len(bags), batch_size):
        idx = list(range(s, min(len(bags), s + batch_size)))
        x, cu = _pack(bags, idx, None, None)
        yield len(idx), x, cu


@torch.no_grad()
def _predict(head: torch.nn.Module, bags: Sequence[Bag], batch_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    head.eval()
    logits, attn = [], []
    for n, x, cu in _batches(bags, batch_size):
        lg, a = head(x, cu)
        logits.append(lg.numpy())
        attn.extend(a[cu[k]:cu[k + 1]].numpy() for k in range(n))
    return np.concatenate(logits).astype(np.float64), attn


@torch.no_grad()
def predict_members(head: HeadEnsemble, bags: Sequence[Bag], batch_size: int = 8, threads: int = 1
                    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """An ensemble's logits [N, C] and attention (as :func:`predict`), plus each member's logits
    [members, N, C], from one forward pass per member (``HeadEnsemble.forward_members``, the same
    pass its ``forward`` averages, so the ensemble's outputs equal ``predict(head, bags)``)."""
    with torch_threads(threads):
        head.eval()
        logits, attn, members = [], [], []
        for n, x, cu in _batches(bags, batch_size):
            lg, a = head.forward_members(x, cu)
            members.append(lg.numpy())
            logits.append(lg.mean(0).numpy())
            attn.extend(a[cu[k]:cu[k + 1]].numpy() for k in range(n))
    return (np.concatenate(logits).astype(np.float64), attn,
            np.concatenate(members, axis=1).astype(np.float64))


def fit_head(train_bags: Sequence[Bag], y_train, val_bags: Sequence[Bag], y_val, cfg: HeadTrainConfig | None = None,
             head_cfg: HeadConfig | None = None, token_targets: Sequence[np.ndarray | None] | None = None
             ) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train a head; return the epoch with the best validation macro AUROC and the history.
    ``head_cfg.ensemble = N``: N heads with seeds ``cfg.seed .. cfg.seed + N - 1``, each stopped
    on validation by itself (history rows carry ``member``). ``token_targets``: per training
    study its token lesion targets [n_i, C] (``probe.token_targets``) or None."""
    cfg, head_cfg = cfg or HeadTrainConfig(), head_cfg or HeadConfig()
    if head_cfg.ensemble > 1:
        return fit_ensemble(train_bags, y_train, val_bags, y_val, cfg, head_cfg, token_targets=token_targets)
    with torch_threads(cfg.threads):
        return _fit_head(train_bags, y_train, val_bags, y_val, cfg, head_cfg, token_targets=token_targets)


def fit_ensemble(train_bags, y_train, val_bags, y_val, cfg: HeadTrainConfig, head_cfg: HeadConfig,
                 first: tuple[torch.nn.Module, list[dict[str, Any]]] | None = None,
                 token_targets: Sequence[np.ndarray | None] | None = None
                 ) -> tuple[HeadEnsemble, list[dict[str, Any]]]:
    """``head_cfg.ensemble`` heads of one kind, member m trained with seed ``cfg.seed + m``;
    ``first``: member 0 already trained (with ``cfg.seed``), e.g. while choosing the head kind."""
    single = replace(head_cfg, ensemble=1)
    members, history = [], []
    pre = None  # the training tokens' statistics, fitted by member 0 and shared (not refitted per member)
    for m in range(head_cfg.ensemble):
        if m == 0 and first is not None:
            head, hist = first
        else:
            with torch_threads(cfg.threads):
                head, hist = _fit_head(train_bags, y_train, val_bags, y_val, replace(cfg, seed=cfg.seed + m), single,
                                       pre, token_targets)
        if head_cfg.standardize and pre is None:
            pre = copy.deepcopy(head.pre.state_dict())
        members.append(head)
        history += [{"member": m, **r} for r in hist]
    ens = HeadEnsemble(members)
    ens.eval()
    return ens, history


def _fit_head(train_bags, y_train, val_bags, y_val, cfg: HeadTrainConfig, head_cfg: HeadConfig,
              pre: dict[str, torch.Tensor] | None = None, token_targets: Sequence[np.ndarray | None] | None = None
              ) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """One head; ``pre``: the feature standardiser's statistics already fitted on these training bags."""
    y_train = np.asarray(y_train, np.float32)
    y_val = np.asarray(y_val, np.float32)
    if len(train_bags) != len(y_train) or len(val_bags) != len(y_val):
        raise ValueError("bags and labels differ in length")
    use_tokens = token_targets is not None and cfg.token_weight > 0
    if use_tokens:
        if len(token_targets) != len(train_bags):
            raise ValueError("token targets and training bags differ in length")
        for i, t in enumerate(token_targets):
            if t is not None and len(t) != len(train_bags[i]):
                raise ValueError(f"token targets of training study {i} have {len(t)} rows, its bag "
                                 f"{len(train_bags[i])} tokens")
        trusted_all = torch.tensor(trusted_pairs(token_targets, y_train))
    dim = int(np.asarray(train_bags[0]).shape[1])
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    head = build_head(head_cfg, dim, y_train.shape[1])
    if head_cfg.standardize and pre is not None:
        head.pre.load_state_dict(pre)
    elif head_cfg.standardize:
        head.pre.fit(train_bags)  # training tokens only: validation and test never shape the features
    known = ~np.isnan(y_train)
    pos = np.nansum(y_train, 0)
    neg = known.sum(0) - pos
    trainable = pos > 0  # a label with no train positives cannot be learned: masked out
    pw = torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, cfg.pos_weight_max), dtype=torch.float32)
    mask_all = torch.tensor(known & trainable[None, :], dtype=torch.float32)
    target_all = torch.tensor(np.nan_to_num(y_train), dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, since, history = -np.inf, copy.deepcopy(head.state_dict()), 0, []
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.randperm(len(train_bags), generator=g).tolist()
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            rows: list | None = [] if use_tokens else None
            x, cu = _pack(train_bags, idx, cfg.max_tokens, g, rows)
            logits, attn = head(x, cu)
            m = mask_all[idx]
            loss = (F.binary_cross_entropy_with_logits(logits, target_all[idx], pos_weight=pw, reduction="none")
                    * m).sum() / m.sum().clamp(min=1)
            if use_tokens:
                les = _pack_targets(token_targets, idx, rows, cu, y_train.shape[1])
                loss = loss + cfg.token_weight * token_loss(head, x, cu, attn, les, trusted_all[idx] & (m > 0),
                                                             cfg.token_balance)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        lv, _ = _predict(head, val_bags, cfg.batch_size)
        score = val_macro_auroc(y_val, lv)
        history.append({"epoch": epoch + 1, "train_loss": total / len(order), "val_macro_auroc": score})
        if np.isfinite(score) and score > best + 1e-6 or (not np.isfinite(best) and epoch == 0):
            best, best_state, since = score if np.isfinite(score) else best, copy.deepcopy(head.state_dict()), 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, history


# -- saving in the model folder ------------------------------------------------------------------
def save_head(folder: str, head: torch.nn.Module, head_cfg: HeadConfig, labels: list[str],
              calibration: dict[str, Any] | None = None, thresholds: dict[str, float] | None = None,
              name: str = "head", features: dict[str, Any] | None = None) -> str:
    """Write ``<name>.safetensors`` and the ``heads.<name>`` entry of ``config.json``.
    ``features``: what the head was fitted on (``FeatureStore.head_features``: encoder, blocks,
    appended histogram bins), so that ``analyze`` builds the same features and refuses heads of
    another encoder."""
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "config.json")):
        write_json(os.path.join(folder, "config.json"), {"format": FORMAT, "format_version": FORMAT_VERSION})
    cfg = read_config(folder)
    dim = head_input_dim(head)
    save_tensors(os.path.join(folder, f"{name}.safetensors"), head.state_dict(), metadata={"format": FORMAT})
    heads = dict(cfg.get("heads", {}))
    heads[name] = {"file": f"{name}.safetensors", "head": asdict(head_cfg), "dim": dim, "labels": list(labels),
                   "calibration": calibration, "thresholds": {k: (v if np.isfinite(v) else None)
                                                             for k, v in (thresholds or {}).items()}}
    if features is not None:
        heads[name]["features"] = dict(features)
    update_config(folder, heads=heads)
    return os.path.join(folder, f"{name}.safetensors")


def load_head(folder: str, name: str = "head") -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = read_config(folder)
    meta = cfg.get("heads", {}).get(name)
    if meta is None:
        raise ModelFolderError(f"{folder}: no head named {name!r} (have {sorted(cfg.get('heads', {}))})")
    head = build_head(HeadConfig(**meta["head"]), meta["dim"], len(meta["labels"]))
    state = load_state(os.path.join(folder, meta["file"]))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFolderError(f"{folder}/{meta['file']}: weights do not fit the head config "
                               f"({str(e).splitlines()[0]})") from None
    head.eval()
    thr = {k: (float("inf") if v is None else v) for k, v in meta["thresholds"].items()}
    return head, {**meta, "thresholds": thr}
