"""Classification and regression metrics, implemented here so their definitions are on the page."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["classification_metrics", "regression_metrics", "steps_to_fraction_of_best"]


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """accuracy; macro-F1 (unweighted mean of per-class F1, a class never predicted nor present counts 0);
    MCC (multiclass Matthews correlation, Gorodkin 2004; equals the binary MCC for 2 classes)."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    total = confusion.sum()
    correct = np.trace(confusion)
    tp = np.diag(confusion)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0
    )
    t, p = confusion.sum(1), confusion.sum(0)  # true and predicted counts per class
    numerator = correct * total - (t * p).sum()
    denominator = math.sqrt((total**2 - (p * p).sum()) * (total**2 - (t * t).sum()))
    return {
        "accuracy": float(correct / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "mcc": float(numerator / denominator) if denominator > 0 else 0.0,
    }


def _rank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / denominator) if denominator > 0 else 0.0

    return {
        "pearson": pearson(predictions, labels),
        "spearman": pearson(_rank(predictions), _rank(labels)),
        "mse": float(np.mean((predictions - labels) ** 2)),
    }


def steps_to_fraction_of_best(curve: list[tuple[int, float]], fraction: float = 0.95) -> int | None:
    """First step whose score reaches ``fraction`` × the run's best (the convergence measure).

    For a best score ≤ 0 (a Pearson correlation can be), "95% of best" is not meaningful; the
    first step that reaches the best itself is returned instead.
    """
    if not curve:
        return None
    best = max(score for _, score in curve)
    threshold = fraction * best if best > 0 else best
    return next(step for step, score in curve if score >= threshold)
