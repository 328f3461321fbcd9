"""Evaluation metrics, checked against cases computed by hand (labels from configs/labels.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producers.task.labels import LabelSet, load_labels
from producers.task.metrics import classification_metrics, decide, expected_calibration_error

LABELS_YAML = Path(__file__).resolve().parents[2] / "configs" / "labels.yaml"
NAMES = ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK"]


@pytest.fixture
def labels() -> LabelSet:
    return load_labels(LABELS_YAML)  # abstain_threshold 0.7, NO_RISK -> HIGH_RISK costs 100


def row(label: str | None, p: float) -> list[float]:
    """Probability ``p`` on ``label`` (None: the null column), the rest spread evenly."""
    column = 4 if label is None else NAMES.index(label)
    out = [(1 - p) / 4] * 5
    out[column] = p
    return out


def test_perfect_predictions(labels: LabelSet) -> None:
    probs = np.array([row(name, 1.0) for name in NAMES])
    m = classification_metrics(probs, list(NAMES), labels)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["per_label_f1"] == dict.fromkeys(NAMES, 1.0)
    assert m["abstain_rate"] == 0.0
    assert m["ece"] == pytest.approx(0.0)
    assert m["critical_error_cost"] == 0.0
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert m["labels"] == NAMES
    assert (m["num_samples"], m["num_abstained"]) == (4, 0)


def test_critical_confusion_is_priced_and_counted(labels: LabelSet) -> None:
    probs = np.array([row("HIGH_RISK", 0.9), row("HIGH_RISK", 0.9), row("MEDIUM_RISK", 0.9), row("LOW_RISK", 0.9)])
    true = ["HIGH_RISK", "NO_RISK", "MEDIUM_RISK", "HIGH_RISK"]
    m = classification_metrics(probs, true, labels)
    assert m["accuracy"] == 0.5
    # NO_RISK answered HIGH_RISK: 100 (critical); HIGH_RISK answered LOW_RISK: 10 (harm weight)
    assert m["critical_error_cost"] == pytest.approx((100 + 10) / 4)
    assert m["confusion_matrix"] == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    # HIGH: tp 1, fp 1, fn 1 -> 0.5; MEDIUM 1.0; LOW: tp 0, fp 1 -> 0; NO: tp 0, fn 1 -> 0
    assert m["per_label_f1"] == {"HIGH_RISK": 0.5, "MEDIUM_RISK": 1.0, "LOW_RISK": 0.0, "NO_RISK": 0.0}
    assert m["macro_f1"] == pytest.approx(1.5 / 4)


def test_abstention_by_threshold_and_by_null_column(labels: LabelSet) -> None:
    probs = np.array(
        [
            row("HIGH_RISK", 0.69),  # below abstain_threshold 0.7: withheld a NO_RISK -> HIGH_RISK
            [0.4, 0.0, 0.0, 0.0, 0.6],  # null column wins over the label's 0.4
            row("NO_RISK", 0.8),  # answered, right
            row(None, 0.9),  # ambiguous row, abstains
        ]
    )
    true = ["NO_RISK", "HIGH_RISK", "NO_RISK", None]
    m = classification_metrics(probs, true, labels)
    assert decide(probs, labels) == [None, None, "NO_RISK", None]
    assert m["num_abstained"] == 3
    assert m["abstain_rate"] == 0.75  # over all rows, ambiguous ones included
    assert m["accuracy"] == pytest.approx(1 / 3)  # abstaining on a labelled row counts as wrong
    assert m["critical_error_cost"] == 0.0  # the withheld NO_RISK -> HIGH_RISK costs nothing
    assert m["confusion_matrix"] == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    # only NO_RISK has support or predictions among answered rows
    assert m["per_label_f1"] == {"HIGH_RISK": 0.0, "MEDIUM_RISK": 0.0, "LOW_RISK": 0.0, "NO_RISK": 1.0}
    assert m["macro_f1"] == 1.0


def test_ece_of_a_known_case(labels: LabelSet) -> None:
    # bin [0.9, 1.0]: confidences 0.95, 0.95, accuracy 1/2 -> gap 0.45, weight 2/3
    # bin [0.8, 0.9): confidence 0.85, accuracy 1 -> gap 0.15, weight 1/3
    probs = np.array([row("HIGH_RISK", 0.95), row("HIGH_RISK", 0.95), row("LOW_RISK", 0.85)])
    m = classification_metrics(probs, ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK"], labels)
    assert m["ece"] == pytest.approx(0.45 * 2 / 3 + 0.15 / 3)
    conf = np.array([0.05, 1.0])
    assert expected_calibration_error(conf, np.array([False, True])) == pytest.approx(0.05 / 2)
    assert expected_calibration_error(np.zeros(0), np.zeros(0, dtype=bool)) == 0.0


def test_empty_evaluation_is_all_zeros(labels: LabelSet) -> None:
    for probs in (np.zeros((0, 5)), np.array([])):
        m = classification_metrics(probs, [], labels)
        assert m["num_samples"] == 0
        assert m["accuracy"] == m["macro_f1"] == m["abstain_rate"] == m["ece"] == m["critical_error_cost"] == 0.0
        assert m["confusion_matrix"] == [[0] * 4 for _ in range(4)]


def test_only_ambiguous_rows(labels: LabelSet) -> None:
    m = classification_metrics(np.array([row(None, 0.9), row("LOW_RISK", 0.9)]), [None, None], labels)
    assert m["accuracy"] == 0.0
    assert m["abstain_rate"] == 0.5
    assert m["critical_error_cost"] == 0.0


def test_result_is_plain_json(labels: LabelSet) -> None:
    probs = np.array([row("HIGH_RISK", 0.9), row("NO_RISK", 0.75)], dtype=np.float32)
    m = classification_metrics(probs, ["HIGH_RISK", "LOW_RISK"], labels)
    assert json.loads(json.dumps(m)) == m
    for key in ("accuracy", "macro_f1", "abstain_rate", "ece", "critical_error_cost"):
        assert type(m[key]) is float, key
    assert type(m["num_samples"]) is int and type(m["num_abstained"]) is int
    assert all(type(v) is int for r in m["confusion_matrix"] for v in r)


def test_bad_inputs_are_rejected(labels: LabelSet) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        classification_metrics(np.zeros((2, 4)), ["HIGH_RISK", "LOW_RISK"], labels)
    with pytest.raises(ValueError, match=r"shape \(1, 5\)"):
        classification_metrics(np.zeros((2, 5)), ["HIGH_RISK"], labels)
    with pytest.raises(ValueError, match="unknown true labels"):
        classification_metrics(np.array([row("HIGH_RISK", 0.9)]), ["CRITICAL"], labels)
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.full((1, 5), np.nan), ["HIGH_RISK"], labels)
