"""Classification metrics on probability matrices: accuracy, macro P/R/F1, NLL, Brier, ECE.

Pure numpy + scikit-learn (scipy for the temperature search). Every function takes
``proba`` shaped ``(n_samples, n_classes)`` with rows summing to 1 and integer labels
``y`` shaped ``(n_samples,)`` in ``0..n_classes-1``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

EPS = 1e-12
"""Probabilities are clipped at this value before taking a log (NLL, temperature fits)."""

ECE_BINS = 15

# log T is searched in [log 0.01, log 100]: far wider than any useful temperature.
TEMPERATURE_RANGE = (1e-2, 1e2)  # what fit_temperature searches
_LOG_T_BOUNDS = (float(np.log(TEMPERATURE_RANGE[0])), float(np.log(TEMPERATURE_RANGE[1])))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``; returns float64 of the same shape."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax along ``axis``; returns float64 of the same shape."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z


def _check(proba: np.ndarray, y: np.ndarray, n_classes: int | None = None, logits: bool = False):
    """Validate and convert ``proba`` (N, C) float64 (or finite ``logits``) and ``y`` (N,) int64."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y)
    if proba.ndim != 2:
        raise ValueError(f"proba must be 2-D (n_samples, n_classes); got shape {proba.shape}")
    if y.ndim != 1 or len(y) != len(proba):
        raise ValueError(
            f"y must be 1-D with one label per row of proba ({len(proba)} rows); "
            f"got shape {y.shape}"
        )
    if n_classes is not None and proba.shape[1] != n_classes:
        raise ValueError(f"proba has {proba.shape[1]} columns but n_classes={n_classes}")
    if logits and not np.isfinite(proba).all():
        raise ValueError("logits must be finite")
    if not logits and not (np.isfinite(proba).all() and (proba >= 0).all()
                           and np.allclose(proba.sum(axis=1), 1, atol=1e-3)):
        raise ValueError("proba must hold probabilities: finite, >= 0, each row summing to 1; for logits, "
                         "pass softmax(logits) (ensemble.metrics.softmax)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices; got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= proba.shape[1]):
        raise ValueError(
            f"labels must be in 0..{proba.shape[1] - 1}; got min {y.min()}, max {y.max()}"
        )
    return proba, y.astype(np.int64, copy=False)


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence in ``n_bins`` equal-width bins (lo, hi]; 0 goes to bin 0."""
    idx = np.ceil(confidence * n_bins).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def _bin_stats(proba: np.ndarray, y: np.ndarray, n_bins: int):
    """Per-bin (count, summed confidence, summed correctness), each shaped (n_bins,)."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(confidence, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return count, conf_sum, acc_sum


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at ``EPS``."""
    proba, y = _check(proba, y)
    p_true = proba[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p_true, EPS, 1.0)))) + 0.0  # not -0.0 ("-0.0000") when every row is sure


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of the summed squared error against the one-hot label (0..2)."""
    proba, y = _check(proba, y)
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def ece(proba: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence in ``n_bins`` equal-width bins."""
    proba, y = _check(proba, y)
    count, conf_sum, acc_sum = _bin_stats(proba, y, n_bins)
    return float(np.sum(np.abs(conf_sum - acc_sum)) / max(len(y), 1))


def score(proba: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Scalar metrics of ``proba`` (N, C) against labels ``y`` (N,).

    Keys: accuracy, precision, recall, f1 (macro, zero_division=0, over the classes that occur
    in ``y``: a few labelled images of 3 classes out of 10 are not scored as if 7 classes had
    been missed, and an image predicted as a class absent from ``y`` counts once, as a miss of
    its own class, not again as a class of precision 0 that would weigh 1/4 of the mean),
    f1_weighted, nll, brier, ece.
    """
    proba, y = _check(proba, y, n_classes)
    pred = proba.argmax(axis=1)
    labels = np.unique(y)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=0
    )
    f1_w = f1_score(y, pred, labels=labels, average="weighted", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "f1_weighted": float(f1_w),
        "nll": nll(proba, y),
        "brier": brier(proba, y),
        "ece": ece(proba, y),
    }


def details(proba: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Confusion matrix (rows = true class, all classes) and per-class P/R/F1/support."""
    proba, y = _check(proba, y, len(class_names))
    pred = proba.argmax(axis=1)
    labels = np.arange(len(class_names))
    confusion = confusion_matrix(y, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        str(name): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {"confusion": confusion.astype(int).tolist(), "per_class": per_class}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)``.

    ``logits`` (N, C) may be any log-probabilities (e.g. ``log(proba)``). Searches log T in
    [log 0.01, log 100] with bounded Brent. The NLL is convex in 1/T, so Brent finds its one
    minimum; it is not capped at ``log(EPS)`` as :func:`nll` is: with a few confidently wrong rows
    the capped NLL has a second, false minimum at a small T.
    """
    logits, y = _check(logits, y, logits=True)
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        z = log_softmax(logits / np.exp(log_t))
        return float(-np.mean(z[rows, y]))

    result = minimize_scalar(
        objective, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5}
    )
    return float(np.exp(result.x))


def reliability(proba: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Reliability-diagram data over ``n_bins`` equal-width top-1 confidence bins.

    Returns {"edges": (n_bins+1,) floats, "confidence": mean confidence per bin,
    "accuracy": accuracy per bin, "count": rows per bin}, all JSON-able lists; empty bins
    have ``None`` for confidence and accuracy (``np.asarray(x, dtype=float)`` turns them to NaN).
    """
    proba, y = _check(proba, y)
    count, conf_sum, acc_sum = _bin_stats(proba, y, n_bins)

    def mean(total: np.ndarray) -> list:
        return [float(t / c) if c else None for t, c in zip(total, count)]

    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "confidence": mean(conf_sum),
        "accuracy": mean(acc_sum),
        "count": count.astype(int).tolist(),
    }
