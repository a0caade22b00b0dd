"""Discrimination and calibration metrics, and bootstrap intervals resampled by patient.

AUROC and average precision follow scikit-learn's definitions exactly (ties count one half;
AP steps at distinct thresholds), so numbers compare with any other tool. The bootstrap draws
*patients* with replacement (a patient's studies move together), expressed as per-study weights,
so 1000 resamples of a few hundred studies and dozens of labels take about a second.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def _clean(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, np.float64).ravel()
    s = np.asarray(s, np.float64).ravel()
    m = ~np.isnan(y)
    return y[m], s[m]


def auroc(y, s) -> float:
    """Area under the ROC curve (Mann-Whitney with tied scores counting one half); NaN if a
    class is absent."""
    y, s = _clean(y, s)
    return float(weighted_auroc(y, s, np.ones((1, len(y))))[0])


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC for each row of study weights ``w`` [B, N] (bootstrap counts): O(B x N)."""
    y = np.asarray(y, np.float64)
    s = np.asarray(s, np.float64)
    order = np.argsort(s, kind="mergesort")
    ss, ys, ws = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])  # groups of tied scores
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * (1 - ys), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def auprc(y, s) -> float:
    """Average precision (scikit-learn's ``average_precision_score``); NaN without positives."""
    y, s = _clean(y, s)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])  # last index of each distinct score
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier(y, p) -> float:
    y, p = _clean(y, p)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def _equal_mass_bins(p: np.ndarray, bins: int) -> list[np.ndarray]:
    order = np.argsort(p, kind="mergesort")
    return [b for b in np.array_split(order, min(bins, len(p))) if len(b)]


def ece(y, p, bins: int = 10) -> float:
    """Expected calibration error with equal-mass bins (each bin holds ~N/bins studies)."""
    y, p = _clean(y, p)
    if not len(y):
        return float("nan")
    return float(sum(len(b) / len(y) * abs(p[b].mean() - y[b].mean()) for b in _equal_mass_bins(p, bins)))


def reliability_curve(y, p, bins: int = 10) -> dict[str, np.ndarray]:
    """Mean predicted vs observed frequency per equal-mass bin, with counts."""
    y, p = _clean(y, p)
    groups = _equal_mass_bins(p, bins) if len(y) else []
    return {"mean_predicted": np.array([p[b].mean() for b in groups]),
            "observed": np.array([y[b].mean() for b in groups]),
            "counts": np.array([len(b) for b in groups])}


# -- bootstrap ------------------------------------------------------------------------------------
def patient_weights(groups, n: int, seed: int) -> np.ndarray:
    """[n, N] study weights: how often each study's patient was drawn in each resample."""
    _, inv = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_pat = inv.max() + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_pat, size=(n, n_pat))
    counts = np.zeros((n, n_pat), np.float64)
    np.add.at(counts, (np.repeat(np.arange(n), n_pat), draws.ravel()), 1.0)
    return counts[:, inv]


def _interval(est: float, samples: np.ndarray, alpha: float) -> dict[str, Any]:
    ok = samples[np.isfinite(samples)]
    if not len(ok) or not np.isfinite(est):
        return {"estimate": float(est), "low": float("nan"), "high": float("nan"), "resamples": int(len(ok))}
    lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return {"estimate": float(est), "low": float(lo), "high": float(hi), "resamples": int(len(ok))}


def _per_label_samples(y: np.ndarray, s: np.ndarray, w: np.ndarray, metric: Callable) -> np.ndarray:
    """[B, C] metric under each resample (NaN where a label lacks a class in that resample)."""
    out = np.full((w.shape[0], y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j])
        if metric is auroc:
            out[:, j] = weighted_auroc(y[m, j], s[m, j], w[:, m])
        else:  # generic metric: expand the weights into index resamples
            idx = np.arange(len(y))[m]
            for b in range(w.shape[0]):
                rep = np.repeat(idx, w[b, m].astype(int))
                out[b, j] = metric(y[rep, j], s[rep, j])
    return out


def bootstrap_ci(y, s, groups, metric: Callable = auroc, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, Any]:
    """Point estimate and percentile interval of one label's metric, resampling patients."""
    y2 = np.asarray(y, np.float64).reshape(-1, 1)
    s2 = np.asarray(s, np.float64).reshape(-1, 1)
    w = patient_weights(groups, n, seed)
    samples = _per_label_samples(y2, s2, w, metric)[:, 0]
    return _interval(metric(y2[:, 0], s2[:, 0]), samples, alpha)


def bootstrap_ci_multilabel(y, s, groups, metric: Callable = auroc, n: int = 1000, seed: int = 0,
                            alpha: float = 0.05) -> dict[str, Any]:
    """Per-label and macro (mean over labels) intervals from the same patient resamples."""
    y = np.asarray(y, np.float64)
    s = np.asarray(s, np.float64)
    w = patient_weights(groups, n, seed)
    samples = _per_label_samples(y, s, w, metric)
    est = np.array([metric(y[:, j], s[:, j]) for j in range(y.shape[1])])
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_samples = np.nanmean(samples, axis=1)
    macro = _interval(float(np.nanmean(est)), macro_samples, alpha)
    macro["n_labels"] = int(np.isfinite(est).sum())
    return {"per_label": [_interval(e, samples[:, j], alpha) for j, e in enumerate(est)], "macro": macro}


def joint_macro_bootstrap(parts: dict[str, tuple], metric: Callable = auroc, n: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> dict[str, Any]:
    """Macro metric of several study sets that share patients (CT and MRI studies of one test split):
    each part's macro interval and the interval of the parts' mean, all from the same patient
    resamples, so a patient drawn twice counts twice in every part (resampling each part on its own
    would treat a patient's CT and MRI as independent). ``parts``: name -> (y [N, C], scores [N, C],
    patient per study)."""
    if not parts:
        raise ValueError("joint_macro_bootstrap: needs at least one part")
    names = list(parts)
    for k in names:
        lens = {len(x) for x in parts[k]}
        if len(parts[k]) != 3 or len(lens) != 1 or 0 in lens:
            raise ValueError(f"joint_macro_bootstrap: part {k!r} needs labels, scores and patients for the same "
                             f"studies (at least one); got lengths {sorted(len(x) for x in parts[k])}")
    ys = [np.asarray(parts[k][0], np.float64).reshape(len(parts[k][0]), -1) for k in names]
    ss = [np.asarray(parts[k][1], np.float64).reshape(y.shape) for k, y in zip(names, ys)]
    sizes = np.cumsum([0] + [len(y) for y in ys])
    w = patient_weights([str(g) for k in names for g in parts[k][2]], n, seed)
    import warnings

    out, samples, ests = {}, [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, (k, y, s) in enumerate(zip(names, ys, ss)):
            samp = np.nanmean(_per_label_samples(y, s, w[:, sizes[i]:sizes[i + 1]], metric), axis=1)
            est = float(np.nanmean([metric(y[:, j], s[:, j]) for j in range(y.shape[1])]))
            out[k] = _interval(est, samp, alpha)
            samples.append(samp)
            ests.append(est)
        out["mean"] = _interval(float(np.mean(ests)), np.mean(samples, axis=0), alpha)
    return out


def paired_bootstrap(y, s_a, s_b, groups, metric: Callable = auroc, n: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, Any]:
    """Macro metric of model A minus model B on the same patient resamples: estimate, interval
    and a two-sided bootstrap p-value for 'no difference'."""
    return replicate_paired_bootstrap(y, [s_a], [s_b], groups, metric, n, seed, alpha)


def replicate_paired_bootstrap(y, s_a: Sequence, s_b: Sequence, groups, metric: Callable = auroc,
                               n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Replicates of A (e.g. one encoder per pretraining seed) against replicates of B (e.g. one
    random init per seed): the mean over A's replicates of the macro metric minus the same mean
    over B's, every replicate scored on the same patient resamples. The interval is the test
    sample's uncertainty about the seed-averaged difference; how much the replicates themselves
    disagree is returned alongside (``a_replicates`` / ``b_replicates``), since a few seeds cannot
    give that spread a bootstrap interval of its own. With equally many replicates on each side
    (paired by position: A's seed i against B's seed i) and at least two pairs, ``replicate_t``
    is the other interval a reviewer needs: Student's t over the per-pair differences, which
    carries the seed-to-seed spread that the patient bootstrap, holding every model fixed, leaves
    out (and, with the test set shared by all pairs, none of the test sample's noise beyond what
    the pairs disagree on). With one replicate each this is the paired bootstrap."""
    if not len(s_a) or not len(s_b):
        raise ValueError("replicate_paired_bootstrap: each side needs at least one set of scores")
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    w = patient_weights(groups, n, seed)
    import warnings

    def side(scores) -> tuple[np.ndarray, list[float]]:
        samples, estimates = [], []
        for s in scores:
            s = np.asarray(s, np.float64).reshape(y.shape)
            samples.append(np.nanmean(_per_label_samples(y, s, w, metric), axis=1))
            estimates.append(float(np.nanmean([metric(y[:, j], s[:, j]) for j in range(y.shape[1])])))
        return np.mean(samples, axis=0), estimates

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, ea = side(s_a)
        b, eb = side(s_b)
    d = a - b
    res = _interval(float(np.mean(ea) - np.mean(eb)), d, alpha)
    ok = d[np.isfinite(d)]
    if len(ok):  # (k + 1) / (n + 1): a bootstrap p-value is never exactly zero
        k = min((ok <= 0).sum(), (ok >= 0).sum())
        res["p_value"] = float(min(1.0, 2 * (k + 1) / (len(ok) + 1)))
    else:
        res["p_value"] = float("nan")
    res["a"], res["b"] = float(np.mean(ea)), float(np.mean(eb))
    if len(s_a) > 1 or len(s_b) > 1:
        res["a_replicates"], res["b_replicates"] = ea, eb
    if len(ea) == len(eb) and np.isfinite(np.subtract(ea, eb)).sum() >= 2:
        res["replicate_t"] = replicate_t_interval(np.subtract(ea, eb), alpha)
    return res


def replicate_t_interval(differences, alpha: float = 0.05) -> dict[str, Any]:
    """Student's t interval for the mean of per-replicate differences (e.g. pretrained minus
    random init, one difference per seed): the between-seed spread as an interval. Few seeds
    give a wide one (t with 2 degrees of freedom is 4.3 at 95 %), which is the honest answer."""
    from scipy import stats

    d = np.asarray(differences, np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        raise ValueError(f"replicate_t_interval: needs at least two finite differences, got {len(d)}")
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    half = float(stats.t.ppf(1 - alpha / 2, len(d) - 1)) * se
    return {"estimate": mean, "low": mean - half, "high": mean + half, "df": len(d) - 1,
            "differences": [float(x) for x in d]}


def replication_verdict(res: dict[str, Any]) -> str:
    """The decision rule for replicated comparisons (bench/eval/seed_replication.sh), applied
    mechanically so nobody reads it off a table: "A better" only if both the patient-bootstrap
    interval and the seed-level t interval (``replicate_t``) of A minus B lie above zero, "A worse"
    if both lie below, otherwise "no evidence". Without a seed-level interval (fewer than two
    paired replicates) the answer is "not replicated": one seed cannot show a method's effect."""
    t = res.get("replicate_t")
    if t is None:
        return "not replicated"
    intervals = [(res["low"], res["high"]), (t["low"], t["high"])]
    if all(np.isfinite(lo) and lo > 0 for lo, _ in intervals):
        return "A better"
    if all(np.isfinite(hi) and hi < 0 for _, hi in intervals):
        return "A worse"
    return "no evidence"


# -- how far a measured ECE can be trusted ---------------------------------------------------------
# Plug-in ECE is biased upward: even a perfectly calibrated model scores about
# sqrt(bins * p(1 - p) / N) because each bin's observed rate is a small-sample estimate. With the
# ~80 test studies of a 500-study archive and 10 bins that floor is ~0.13, so "ECE <= 0.05" cannot
# be shown by the plug-in number alone. These functions say what a perfectly calibrated model with
# the same predictions would score, test calibration against that, and give the debiased
# squared-error estimator of Kumar, Liang and Ma (NeurIPS 2019, "Verified uncertainty calibration").
def ece_null(p, bins: int = 10, n: int = 2000, seed: int = 0) -> np.ndarray:
    """[n] plug-in ECEs of a perfectly calibrated model with predictions ``p``: labels drawn as
    Bernoulli(p), the same equal-mass bins (they depend on ``p`` only)."""
    p = np.asarray(p, np.float64).ravel()
    p = p[np.isfinite(p)]
    if not len(p):
        return np.full(n, np.nan)
    rng = np.random.default_rng(seed)
    draws = rng.random((n, len(p))) < p  # [n, N] simulated labels
    out = np.zeros(n)
    for b in _equal_mass_bins(p, bins):
        out += len(b) / len(p) * np.abs(p[b].mean() - draws[:, b].mean(1))
    return out


def debiased_squared_ce(y, p, bins: int = 10) -> float:
    """Unbiased estimate of the binned squared calibration error sum_b w_b (mean_p_b - rate_b)^2:
    each bin's plug-in square minus its sampling variance rate(1 - rate) / (n_b - 1). May be
    negative when the data are consistent with perfect calibration."""
    y, p = _clean(y, p)
    if not len(y):
        return float("nan")
    total = 0.0
    for b in _equal_mass_bins(p, bins):
        nb = len(b)
        rate = y[b].mean()
        sq = (p[b].mean() - rate) ** 2
        if nb > 1:
            sq -= rate * (1 - rate) / (nb - 1)
        total += nb / len(y) * sq
    return float(total)


def calibration_check(y, p, bins: int = 10, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Plug-in ECE beside what perfect calibration would score on the same predictions.

    ``ece_floor`` is the null mean (the estimator's bias at this sample size), ``ece_null_q95``
    its 95th percentile, ``p_value`` the share of null draws at least as large as the observed
    ECE (small: miscalibration beyond sampling noise), ``rmsce_debiased`` the square root of the
    debiased squared error (0 when it is negative). RMS >= mean absolute error, so an RMS bound
    is a conservative bound on ECE."""
    y, p = _clean(y, p)
    e = ece(y, p, bins)
    null = ece_null(p, bins, n, seed)
    sq = debiased_squared_ce(y, p, bins)
    ok = null[np.isfinite(null)]
    return {"ece": e, "ece_floor": float(ok.mean()) if len(ok) else float("nan"),
            "ece_null_q95": float(np.quantile(ok, 0.95)) if len(ok) else float("nan"),
            "p_value": float((1 + (ok >= e - 1e-12).sum()) / (1 + len(ok))) if len(ok) else float("nan"),
            "squared_ce_debiased": sq, "rmsce_debiased": float(np.sqrt(max(sq, 0.0))) if np.isfinite(sq) else sq}


def studies_for_ece_floor(p, target: float = 0.05, bins: int = 10, sims: int = 200, seed: int = 0,
                          max_n: int = 100_000) -> int:
    """Smallest test-set size (doubling, then bisection) at which a perfectly calibrated model
    whose predictions look like ``p`` has a mean plug-in ECE <= ``target``: how big a test split
    must be before the ECE target is measurable at all."""
    p = np.asarray(p, np.float64).ravel()
    p = p[np.isfinite(p)]
    if not len(p):
        return -1
    rng = np.random.default_rng(seed)

    def floor(n: int) -> float:
        return float(ece_null(rng.choice(p, size=n, replace=True), bins, sims, seed).mean())

    lo, hi = bins, bins
    while floor(hi) > target:
        lo, hi = hi, hi * 2
        if hi > max_n:
            return -1
    while hi - lo > max(1, lo // 20):  # 5 % resolution is plenty for a sample-size statement
        mid = (lo + hi) // 2
        if floor(mid) > target:
            lo = mid
        else:
            hi = mid
    return int(hi)


def calibration_resolution(y, p, labels: list[str], seed: int = 0) -> dict[str, Any]:
    """Can this test split show ECE <= 0.05 at all? For labels' truths ``y`` [N, L] (NaN =
    unknown) and calibrated probabilities ``p`` [N, L]: the mean plug-in ECE beside its floor,
    the debiased RMS error (root of the mean debiased square: unbiased before the root, where a
    mean of per-label roots clipped at zero would be biased up by small bins' noise), labels
    miscalibrated beyond sampling noise (p < 0.05), the ECE pooled over every probability with
    its floor, and the median test size at which a perfectly calibrated model's floor is 0.05."""
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    p = np.asarray(p, np.float64).reshape(y.shape)
    m = ~np.isnan(y)
    checks = [calibration_check(y[m[:, k], k], p[m[:, k], k], seed=seed) for k in range(y.shape[1])]
    need = [studies_for_ece_floor(p[m[:, k], k], 0.05, seed=seed) for k in range(y.shape[1])]
    pooled = calibration_check(y[m], p[m], seed=seed)
    return {"ece_after_mean": float(np.mean([c["ece"] for c in checks])),
            "ece_floor_mean": float(np.mean([c["ece_floor"] for c in checks])),
            "rmsce_debiased_mean": float(np.sqrt(max(0.0, np.mean([c["squared_ce_debiased"] for c in checks])))),
            "miscalibrated_labels": [lab for lab, c in zip(labels, checks) if c["p_value"] < 0.05],
            "pooled_ece": pooled["ece"], "pooled_ece_floor": pooled["ece_floor"], "pooled_ece_p": pooled["p_value"],
            "pooled_rmsce_debiased": pooled["rmsce_debiased"], "pooled_n": int(m.sum()),
            "test_studies_for_floor_0_05_median": int(np.median(need)) if need else None,
            "note": "plug-in ECE with 10 equal-mass bins is biased upward by about "
                    "sqrt(10 p(1-p)/N); ece_floor is that bias for these predictions"}
