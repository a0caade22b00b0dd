"""Calibration fitted on validation only, per-label operating points, and triage.

The reference head called stroke in more than half of an external set at a 0.5 threshold: a
head's raw probability is not a probability. Here every label gets a calibration map fitted on
the validation split (temperature, or Platt's two parameters which also correct the shift that
class-balanced training puts into the logits) and a threshold chosen on validation for a
target sensitivity; test numbers then show what those choices give on unseen patients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from neurovfm.synth.tables import ACUITY_LEVELS

LOG_T_RANGE = (-2.0, 4.0)  # temperatures between e^-2 (a floor: separable data) and e^4
NEWTON_STEPS = 50
PLATT_RIDGE = 1e-3  # keeps (a, b) finite when validation separates perfectly


def sigmoid(x):
    """Logistic function, clipped so huge logits never overflow."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(sigmoid(z), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_logistic(x: np.ndarray, t: np.ndarray, ridge: np.ndarray, prior: np.ndarray | None = None,
                 steps: int = NEWTON_STEPS) -> np.ndarray:
    """Weights of a logistic regression of (soft) targets ``t`` on ``x`` (bias as a column of
    ``x``) with a per-weight ridge pulling toward ``prior``: damped Newton, the step halved until
    the loss falls. Shared by Platt scaling and the shortcut probe."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    ridge = np.asarray(ridge, np.float64)
    prior = np.zeros(x.shape[1]) if prior is None else np.asarray(prior, np.float64)

    def loss(w: np.ndarray) -> float:
        z = x @ w
        return float(np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * np.sum(ridge * (w - prior) ** 2))

    w = prior.copy()
    cur = loss(w)
    for _ in range(steps):
        p = sigmoid(x @ w)
        g = x.T @ (p - t) / len(t) + ridge * (w - prior)
        h = (x * (p * (1 - p))[:, None]).T @ x / len(t) + np.diag(ridge + 1e-9)
        step = np.linalg.solve(h, g)
        lr = 1.0
        while lr > 1e-8 and loss(w - lr * step) > cur:
            lr /= 2
        w = w - lr * step
        new = loss(w)
        if cur - new < 1e-12:
            break
        cur = new
    return w


def _usable(y: np.ndarray) -> bool:
    return 0 < np.nansum(y) < np.sum(~np.isnan(y))


class TemperatureScaler:
    """p = sigmoid(z / T) per label, T by minimising validation NLL (golden-section on log T).
    A label without both classes on validation keeps T = 1."""

    def __init__(self, temperatures: np.ndarray | None = None):
        self.t = None if temperatures is None else np.asarray(temperatures, np.float64)

    def fit(self, logits, y) -> "TemperatureScaler":
        z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
        self.t = np.ones(z.shape[1])
        for j in range(z.shape[1]):
            m = ~np.isnan(y[:, j])
            if not _usable(y[m, j]):
                continue
            zj, yj = z[m, j], y[m, j]
            lo, hi = LOG_T_RANGE
            g = (math.sqrt(5) - 1) / 2
            for _ in range(80):
                a, b = hi - g * (hi - lo), lo + g * (hi - lo)
                if _nll(zj / math.exp(a), yj) < _nll(zj / math.exp(b), yj):
                    hi = b
                else:
                    lo = a
            self.t[j] = math.exp((lo + hi) / 2)
        return self

    def transform(self, logits) -> np.ndarray:
        return sigmoid(np.asarray(logits, np.float64) / self.t)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "temperature", "temperature": self.t.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TemperatureScaler":
        return cls(np.array(d["temperature"]))


def _monotone(w: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A calibration map may not reverse the head's ranking: a negative fitted slope (validation
    scores anti-correlated with the labels, on a few dozen studies: noise, not signal) becomes
    slope 0 with the intercept at the (smoothed) base rate."""
    if w[0] >= 0:
        return w
    rate = float(np.clip(np.mean(t), 1e-6, 1 - 1e-6))
    return np.array([0.0, math.log(rate / (1 - rate))])


class PlattScaler:
    """p = sigmoid(a z + b) per label, fitted by Newton's method on validation with Platt's
    smoothed targets and a small ridge. Without both classes: a = 1, b = 0 (identity)."""

    def __init__(self, a: np.ndarray | None = None, b: np.ndarray | None = None):
        self.a = None if a is None else np.asarray(a, np.float64)
        self.b = None if b is None else np.asarray(b, np.float64)

    def fit(self, logits, y) -> "PlattScaler":
        z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
        c = z.shape[1]
        self.a, self.b = np.ones(c), np.zeros(c)
        for j in range(c):
            m = ~np.isnan(y[:, j])
            if not _usable(y[m, j]):
                continue
            zj, yj = z[m, j], y[m, j]
            n_pos, n_neg = yj.sum(), len(yj) - yj.sum()
            t = np.where(yj == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
            x = np.stack([zj, np.ones_like(zj)], 1)
            prior = np.array([1.0, 0.0])

            w = _monotone(fit_logistic(x, t, PLATT_RIDGE * np.ones(2), prior), t)
            self.a[j], self.b[j] = w
        return self

    def transform(self, logits) -> np.ndarray:
        return sigmoid(self.a * np.asarray(logits, np.float64) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "platt", "a": self.a.tolist(), "b": self.b.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlattScaler":
        return cls(np.array(d["a"]), np.array(d["b"]))


SHRINK_GRID = (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
SHRINK_FOLDS = 5


class ShrunkPlattScaler(PlattScaler):
    """Platt scaling pulled toward 'no information' — slope 0, intercept at the logit of the
    validation base rate — with the pull chosen per label by cross-validated log loss *within*
    the validation split (stratified folds, seeded).

    With the 30-50 validation studies of a small archive, plain Platt fits two parameters to a
    handful of positives, and a head that barely ranks a label gets a confident slope that does
    not hold on test. Here such a label falls back toward its base rate, while a label the head
    ranks well keeps an (almost) unshrunk fit. The result is an ordinary Platt map (a, b), saved
    and applied exactly like one."""

    def __init__(self, a=None, b=None, grid=SHRINK_GRID, folds: int = SHRINK_FOLDS, seed: int = 0):
        super().__init__(a, b)
        self.grid, self.folds, self.seed = tuple(grid), folds, seed
        self.shrink: np.ndarray | None = None

    @staticmethod
    def _fit_one(z: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
        n_pos, n_neg = y.sum(), len(y) - y.sum()
        t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        base = (n_pos + 1) / (len(y) + 2)
        prior = np.array([0.0, math.log(base / (1 - base))])
        return _monotone(fit_logistic(np.stack([z, np.ones_like(z)], 1), t, (lam + PLATT_RIDGE) * np.ones(2), prior), t)

    def _cv_loss(self, z: np.ndarray, y: np.ndarray, lam: float, fold: np.ndarray) -> float:
        loss = 0.0
        for k in range(self.folds):
            tr, te = fold != k, fold == k
            if not te.any() or not _usable(y[tr]):
                continue
            a, b = self._fit_one(z[tr], y[tr], lam)
            loss += _nll(a * z[te] + b, y[te]) * te.sum()
        return loss

    def fit(self, logits, y) -> "ShrunkPlattScaler":
        z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
        c = z.shape[1]
        self.a, self.b, self.shrink = np.ones(c), np.zeros(c), np.full(c, np.nan)
        for j in range(c):
            m = ~np.isnan(y[:, j])
            if not _usable(y[m, j]):
                continue
            zj, yj = z[m, j], y[m, j]
            rng = np.random.default_rng([self.seed, j])
            fold = np.empty(len(yj), np.int64)  # stratified: positives and negatives dealt round the folds
            for cls in (0.0, 1.0):
                idx = np.flatnonzero(yj == cls)
                fold[rng.permutation(idx)] = np.arange(len(idx)) % self.folds
            losses = [self._cv_loss(zj, yj, lam, fold) for lam in self.grid]
            lam = self.grid[int(np.argmin(losses))]
            self.a[j], self.b[j] = self._fit_one(zj, yj, lam)
            self.shrink[j] = lam
        return self

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # kind "platt": applied exactly like plain Platt
        d["fitted_with"] = "shrunk-platt (pull toward the base rate chosen by cross-validation on validation)"
        d["shrink"] = [None if not np.isfinite(x) else float(x) for x in self.shrink]
        return d


CALIBRATIONS = ("platt", "temperature", "shrunk-platt")


def make_scaler(kind: str, seed: int = 0):
    """A fresh calibration map of ``kind`` (see CALIBRATIONS)."""
    if kind == "temperature":
        return TemperatureScaler()
    if kind == "platt":
        return PlattScaler()
    if kind == "shrunk-platt":
        return ShrunkPlattScaler(seed=seed)
    raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {kind!r}")


def scaler_from_dict(d: dict[str, Any]):
    """The saved map, as the class that fitted it (so a refit, e.g. on another site's validation
    split, is done the same way; a shrunk-Platt map applies exactly like a Platt map)."""
    if d["kind"] == "platt" and str(d.get("fitted_with", "")).startswith("shrunk-platt"):
        return ShrunkPlattScaler.from_dict(d)
    return {"temperature": TemperatureScaler, "platt": PlattScaler}[d["kind"]].from_dict(d)


# -- operating points -----------------------------------------------------------------------------
def threshold_for_sensitivity(y, p, target: float = 0.9) -> float:
    """The highest threshold whose sensitivity (p >= t among positives) reaches ``target``;
    +inf (flag nothing) when there are no positives to choose from."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    m = ~np.isnan(y)
    pos = np.sort(p[m][y[m] == 1])[::-1]
    if not len(pos):
        return float("inf")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[k - 1])


def threshold_for_flag_rate(p, rate: float) -> float:
    """Threshold flagging (p >= t) about ``rate`` of the studies."""
    p = np.sort(np.asarray(p, np.float64))[::-1]
    k = int(round(rate * len(p)))
    return float("inf") if k <= 0 else float(p[min(k, len(p)) - 1])


def operating_stats(y, p, thr: float) -> dict[str, Any]:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    m = ~np.isnan(y)
    y, p = y[m], p[m]
    f = p >= thr
    tp, fp = int((f & (y == 1)).sum()), int((f & (y == 0)).sum())
    fn, tn = int((~f & (y == 1)).sum()), int((~f & (y == 0)).sum())
    nan = float("nan")
    return {"sensitivity": tp / (tp + fn) if tp + fn else nan, "specificity": tn / (tn + fp) if tn + fp else nan,
            "ppv": tp / (tp + fp) if tp + fp else nan, "flag_rate": float(f.mean()) if len(f) else nan,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# -- triage ---------------------------------------------------------------------------------------
def urgent_score(probs, labels: list[str], acuity: dict[str, str]) -> np.ndarray:
    """Per study, the highest calibrated probability over the Urgent labels."""
    cols = [j for j, lab in enumerate(labels) if acuity.get(lab) == "Urgent"]
    probs = np.asarray(probs, np.float64)
    return probs[:, cols].max(1) if cols else np.zeros(len(probs))


def triage_levels(probs, labels: list[str], thresholds: dict[str, float], acuity: dict[str, str]) -> list[str]:
    """The most severe acuity among the labels flagged at their thresholds (Normal if none)."""
    probs = np.asarray(probs, np.float64)
    rank = {lv: i for i, lv in enumerate(ACUITY_LEVELS)}
    out = []
    for row in probs:
        best = "Normal"
        for j, lab in enumerate(labels):
            lv = acuity.get(lab, "Routine")
            if row[j] >= thresholds.get(lab, float("inf")) and rank[lv] < rank[best]:
                best = lv
        out.append(best)
    return out


def sensitivity_at_matched_flag_rate(is_urgent_test, score_test, score_val, rate: float) -> dict[str, Any]:
    """Urgent sensitivity and specificity on test at the threshold that flags ``rate`` of the
    *validation* studies (the comparator's flag rate), with the flag rate it gives on test."""
    thr = threshold_for_flag_rate(score_val, rate)
    st = operating_stats(np.asarray(is_urgent_test, np.float64), score_test, thr)
    return {"threshold": thr, "target_flag_rate": rate, "flag_rate": st["flag_rate"],
            "sensitivity": st["sensitivity"], "specificity": st["specificity"], "ppv": st["ppv"]}
