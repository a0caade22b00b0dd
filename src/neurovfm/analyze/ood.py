"""Distance to the training data: is this study like the ones the heads were fitted on?

A study is summarised by the mean of its frozen token features. On the training studies of one
modality we fit a principal subspace; a study's score is the root-mean-square of its whitened
coordinates in that subspace together with its (scaled) distance from it. The warning threshold
is a quantile of the *validation* studies' scores, so about 1 - quantile of in-distribution
studies are flagged by design and anything unlike the archive scores higher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from neurovfm.models.folder import load_state, read_config, save_tensors, update_config


@dataclass
class OODModel:
    mean: np.ndarray  # [D]
    components: np.ndarray  # [D, k] orthonormal
    scale: np.ndarray  # [k] standard deviation along each component (train)
    residual_scale: float  # RMS distance from the subspace (validation studies)
    threshold: float  # quantile of validation scores
    quantile: float
    n_train: int
    n_val: int

    def score(self, study_mean: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(study_mean, np.float64)) - self.mean
        z = x @ self.components
        resid = np.linalg.norm(x - z @ self.components.T, axis=1) / self.residual_scale
        k = self.components.shape[1]
        return np.sqrt(((z / self.scale) ** 2).sum(1) / (k + 1) + resid ** 2 / (k + 1))


def fit_ood(train_means: np.ndarray, val_means: np.ndarray, k: int = 16, quantile: float = 0.99) -> OODModel:
    """Fit on training study means; set the threshold on validation study means."""
    xt = np.asarray(train_means, np.float64)
    if len(xt) < 3 or len(val_means) < 1:
        raise ValueError("distance-to-training needs >= 3 training and >= 1 validation studies")
    mu = xt.mean(0)
    _, s, vt = np.linalg.svd(xt - mu, full_matrices=False)
    k = int(min(k, len(xt) - 1, xt.shape[1]))
    comp = vt[:k].T
    scale = np.maximum(s[:k] / np.sqrt(max(len(xt) - 1, 1)), 1e-6)
    # the distance-from-subspace scale comes from the held-out validation studies: training
    # studies lie in their own subspace almost exactly when there are few of them
    xv = np.asarray(val_means, np.float64) - mu
    resid = np.linalg.norm(xv - xv @ comp @ comp.T, axis=1)
    rs = float(max(np.sqrt(np.mean(resid ** 2)), 1e-6))
    m = OODModel(mu, comp, scale, rs, 0.0, quantile, len(xt), len(val_means))
    m.threshold = float(np.quantile(m.score(val_means), quantile))
    return m


def save_ood(folder: str, modality: str, m: OODModel) -> None:
    name = f"ood_{modality.lower()}"
    save_tensors(os.path.join(folder, f"{name}.safetensors"),
                 {"mean": torch.from_numpy(m.mean.astype(np.float32)),
                  "components": torch.from_numpy(np.ascontiguousarray(m.components, np.float32)),
                  "scale": torch.from_numpy(m.scale.astype(np.float32))})
    ood = dict(read_config(folder).get("ood", {}))
    ood[modality.upper()] = {"file": f"{name}.safetensors", "residual_scale": m.residual_scale,
                             "threshold": m.threshold, "quantile": m.quantile, "n_train": m.n_train, "n_val": m.n_val}
    update_config(folder, ood=ood)


def load_ood(folder: str, modality: str) -> OODModel | None:
    meta = read_config(folder).get("ood", {}).get(modality.upper())
    if not meta:
        return None
    t = load_state(os.path.join(folder, meta["file"]))
    return OODModel(t["mean"].double().numpy(), t["components"].double().numpy(), t["scale"].double().numpy(),
                    float(meta["residual_scale"]), float(meta["threshold"]), float(meta["quantile"]),
                    int(meta["n_train"]), int(meta["n_val"]))
