"""Accuracy estimated without labels (confidence-based performance estimation, CBPE) and a multivariate drift
score (PCA reconstruction error), both calibrated on the reference split, both with reference-chunk thresholds.

CBPE: on the reference split (held out from training, labelled) an isotonic regression maps the model's top-class
probability to the chance that its prediction is right; on a window the estimated accuracy is the mean of those
calibrated chances. Its band is `sigmas` standard deviations of two errors: sampling (the realized accuracy of n
rows whose chances are c_i varies by sqrt(sum c_i (1 - c_i)) / n) and calibration (the reference's own accuracy is
known to sqrt(a (1 - a) / n_ref)). It assumes the chance of being right given the confidence holds in production
(covariate shift, not concept shift); under strong shifts the champion is over-confident and the estimate falls
less than the truth, so it is a floor-side alarm, not a measurement: realized accuracy replaces it when labels come.

Multivariate drift: a PCA fitted on the standardised reference (keeping `variance` of it) reconstructs each row;
the window's mean reconstruction error over the reference's out-of-fold error is the score. A joint shift that
keeps every column's distribution (broken correlations) raises it while the per-column tests see nothing.

Both alarm lines come from the reference itself: bootstrap chunks of the window's size give the spread of the
figure when nothing changed, and the alarm is `sigmas` of those spreads away (an alert budget, not a p-value).
This module is pure: numpy and scikit-learn, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Calibration:
    """Top-label calibration of one model on the reference split."""

    confidence: np.ndarray  # the reference rows' top-class probabilities
    correct: np.ndarray  # whether each reference prediction was right (0/1)
    model: object  # the fitted IsotonicRegression: confidence -> P(right)

    @property
    def reference_accuracy(self) -> float:
        return float(self.correct.mean())

    def chances(self, proba: np.ndarray) -> np.ndarray:
        return np.clip(self.model.predict(top(proba)), 0.0, 1.0)


@dataclass(frozen=True)
class Estimate:
    accuracy: float
    low: float
    high: float
    sd: float


def top(proba: np.ndarray) -> np.ndarray:
    """Top-class probability per row; logits (rows not summing to 1) go through a softmax first."""
    p = np.asarray(proba, dtype="float64")
    if p.ndim != 2 or not p.size:
        raise ValueError(f"probabilities must be a (rows, classes) array, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        p = softmax(p)
    return p.max(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype="float64")
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def calibrate(proba: np.ndarray, correct: np.ndarray) -> Calibration:
    """Fit confidence -> P(right) on the reference rows (isotonic, monotone, clipped outside the seen range)."""
    from sklearn.isotonic import IsotonicRegression

    conf, ok = top(proba), np.asarray(correct, dtype="float64")
    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, ok)
    return Calibration(conf, ok, model)


def estimate(cal: Calibration, proba: np.ndarray, sigmas: float) -> Estimate:
    """Estimated accuracy of the rows whose probabilities are `proba`, with a band of `sigmas` standard deviations."""
    c = cal.chances(proba)
    n, n_ref, a = len(c), len(cal.correct), cal.reference_accuracy
    sd = float(np.sqrt((c * (1 - c)).sum() / n**2 + a * (1 - a) / n_ref))
    value = float(c.mean())
    return Estimate(value, max(0.0, value - sigmas * sd), min(1.0, value + sigmas * sd), sd)


def chunk_spread(values: np.ndarray, rows: int, chunks: int, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of the mean of `values` over `chunks` bootstrap chunks of `rows` rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(chunks, rows))
    means = np.asarray(values)[idx].mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1)) if chunks > 1 else 0.0


def estimate_alarm(cal: Calibration, rows: int, sigmas: float, max_drop_points: float, chunks: int,
                   seed: int) -> float:
    """The accuracy below which an estimate on a window of `rows` rows alarms: the reference's calibrated chances,
    chunked to that size, `sigmas` spreads below their mean, and never closer than `max_drop_points` to the
    reference accuracy."""
    _, sd = chunk_spread(np.clip(cal.model.predict(cal.confidence), 0.0, 1.0), rows, chunks, seed)
    a, n_ref = cal.reference_accuracy, len(cal.correct)
    sd = float(np.sqrt(sd**2 + a * (1 - a) / n_ref))  # the reference's own accuracy is known only this well
    return min(a - sigmas * sd, a - max_drop_points / 100)


@dataclass(frozen=True)
class Joint:
    """The multivariate score of a window: its reconstruction error relative to the reference's, and the line."""

    ratio: float  # window mean error / reference out-of-fold mean error (1: like the reference)
    threshold: float
    drift: bool
    components: int


def _prepare(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise by the reference; missing values take the reference mean (0 after scaling)."""
    ref = np.asarray(reference, dtype="float64")
    cur = np.asarray(current, dtype="float64")
    mu = np.nanmean(ref, axis=0)
    mu = np.where(np.isnan(mu), 0.0, mu)
    sd = np.nanstd(ref, axis=0)
    sd = np.where((sd > 0) & np.isfinite(sd), sd, 1.0)
    scale = lambda x: np.nan_to_num((x - mu) / sd, nan=0.0, posinf=1e6, neginf=-1e6)  # noqa: E731
    return scale(ref), scale(cur)


def _errors(fit: np.ndarray, rows: np.ndarray, variance: float) -> tuple[np.ndarray, int]:
    """Reconstruction error of `rows` by the principal components of `fit` that keep `variance` of it."""
    mean = fit.mean(axis=0)
    _, sv, vt = np.linalg.svd(fit - mean, full_matrices=False)
    ratio = sv**2 / max(float((sv**2).sum()), 1e-12)
    keep = min(int(np.searchsorted(np.cumsum(ratio), variance) + 1), len(sv))
    comps = vt[:keep]
    centred = rows - mean
    back = centred @ comps.T @ comps
    return np.sqrt(((centred - back) ** 2).sum(axis=1)), keep


def joint_drift(reference: np.ndarray, current: np.ndarray, variance: float, sigmas: float, chunks: int,
                seed: int, threshold: float | None = None, folds: int = 5) -> Joint:
    """PCA reconstruction error of `current` against `reference` (features only, numeric). The line is
    `threshold` when given, else derived: the reference's out-of-fold errors in bootstrap chunks of the window's
    size, `sigmas` spreads above their mean (as a ratio to that mean)."""
    ref, cur = _prepare(reference, current)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(ref)) % folds
    oof = np.empty(len(ref))
    for f in range(folds):
        oof[fold == f], _ = _errors(ref[fold != f], ref[fold == f], variance)
    errs, k = _errors(ref, cur, variance)
    mean, sd = chunk_spread(oof, len(cur), chunks, seed)
    sd = float(np.sqrt(sd**2 + oof.var(ddof=1) / len(oof)))  # ... and the reference's own mean error this well
    line = threshold if threshold is not None else 1.0 + sigmas * sd / mean
    ratio = float(errs.mean() / mean) if mean > 0 else float("inf")
    return Joint(ratio, float(line), bool(ratio > line), k)


def impact(predict, reference, window, columns: list[str]) -> dict[str, float]:
    """Per column, a label-free weight of its drift by the model's use of it: the share of reference rows whose
    prediction changes when that column alone is moved to the window's distribution (quantile mapping: each
    reference value goes to the window's value at the same rank, so the rows keep their joint structure).
    0: the column did not move, or the model ignores it."""
    moved, used = [], []
    for col in columns:
        seen = window[col].dropna().to_numpy(dtype="float64")
        if not len(seen):
            continue
        ranks = reference[col].rank(pct=True, method="average").fillna(0.5).to_numpy()
        part = reference.copy()
        part[col] = np.quantile(seen, np.clip(ranks - 0.5 / len(reference), 0, 1), method="inverted_cdf")
        moved.append(part)
        used.append(col)
    if not used:
        return {}
    preds = np.asarray(predict(pd.concat([reference, *moved], ignore_index=True))).reshape(len(used) + 1, -1)
    return {col: float((preds[i + 1] != preds[0]).mean()) for i, col in enumerate(used)}  # one call: cheap
