"""Evaluation metrics of the risk classifier, from per-answer probabilities (numpy only).

``probs`` has one row per example and one column per label (``LabelSet`` order) plus a last
"null/abstain" column. An answer abstains when the null column wins or the best label's
probability is below ``labels.abstain_threshold``; abstaining on a labelled example counts as
wrong for accuracy but costs nothing in ``critical_error_cost``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from producers.task.labels import LabelSet

ECE_BINS = 10


def _as_probs(probs: npt.ArrayLike, n: int, labels: LabelSet) -> npt.NDArray[np.float64]:
    width = len(labels.labels) + 1
    array = np.asarray(probs, dtype=np.float64)
    if array.size == 0 and n == 0:
        return np.zeros((0, width))
    if array.ndim != 2 or array.shape != (n, width):
        raise ValueError(f"probs must have shape ({n}, {width}) (labels + null column), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("probs contains NaN or infinite values")
    return array


def decide(probs: npt.ArrayLike, labels: LabelSet) -> list[str | None]:
    """The answer for each row: the most probable label, or None where the answer abstains."""
    array = np.asarray(probs, dtype=np.float64)
    pred, _, abstained = _decisions(_as_probs(array, len(array) if array.ndim else 0, labels), labels)
    return [None if a else labels.names[int(p)] for p, a in zip(pred, abstained, strict=True)]


def _decisions(
    probs: npt.NDArray[np.float64], labels: LabelSet
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    n_labels = len(labels.labels)
    pred = np.argmax(probs[:, :n_labels], axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    confidence = probs[np.arange(len(probs)), pred]
    null_wins = np.argmax(probs, axis=1) == n_labels if len(probs) else np.zeros(0, dtype=bool)
    abstained = null_wins | (confidence < labels.abstain_threshold)
    return pred.astype(np.int64), confidence, abstained


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def expected_calibration_error(confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_]) -> float:
    """ECE over 10 equal-width confidence bins ([0, 0.1), …, [0.9, 1.0]); 0.0 for no rows."""
    if len(confidence) == 0:
        return 0.0
    bins = np.minimum((confidence * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        gap = abs(float(confidence[members].mean()) - float(correct[members].mean()))
        total += gap * int(members.sum())
    return total / len(confidence)


def classification_metrics(probs: npt.ArrayLike, true: Sequence[str | None], labels: LabelSet) -> dict[str, Any]:
    """Accuracy, F1, abstention, calibration and harm-weighted error cost of one evaluation.

    ``true[i]`` is the label of row ``i``, or None for an ambiguous row (where abstaining is
    right). Accuracy and ``critical_error_cost`` are over labelled rows; F1, ECE and the
    confusion matrix over labelled rows that did not abstain; ``abstain_rate`` over all rows.
    Every value is a plain int, float, list or dict, ready for JSON.
    """
    names = labels.names
    n = len(true)
    array = _as_probs(probs, n, labels)
    unknown = sorted({t for t in true if t is not None and t not in names})
    if unknown:
        raise ValueError(f"unknown true labels {unknown} (labels: {', '.join(names)})")
    pred, confidence, abstained = _decisions(array, labels)
    labelled = np.array([t is not None for t in true], dtype=bool)
    true_idx = np.array([names.index(t) if t is not None else -1 for t in true], dtype=np.int64)
    answered = labelled & ~abstained
    correct = answered & (pred == true_idx)

    n_labels = len(names)
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (true_idx[answered], pred[answered]), 1)
    per_label_f1: dict[str, float] = {}
    counted: list[float] = []
    for k, name in enumerate(names):
        tp = int(matrix[k, k])
        fn = int(matrix[k, :].sum()) - tp
        fp = int(matrix[:, k].sum()) - tp
        per_label_f1[name] = _f1(tp, fp, fn)
        if tp + fn + fp > 0:  # a label never seen nor predicted says nothing about the model
            counted.append(per_label_f1[name])

    n_labelled = int(labelled.sum())
    cost = sum(
        labels.confusion_cost(names[int(true_idx[i])], names[int(pred[i])]) for i in np.flatnonzero(answered & ~correct)
    )
    num_abstained = int(abstained.sum())
    return {
        "accuracy": float(correct.sum()) / n_labelled if n_labelled else 0.0,
        "macro_f1": float(np.mean(counted)) if counted else 0.0,
        "per_label_f1": per_label_f1,
        "abstain_rate": num_abstained / n if n else 0.0,
        "ece": expected_calibration_error(confidence[answered], correct[answered]),
        "critical_error_cost": float(cost) / n_labelled if n_labelled else 0.0,
        "labels": list(names),
        "confusion_matrix": matrix.tolist(),
        "num_samples": n,
        "num_abstained": num_abstained,
    }
