"""The classification metrics a Trainer evaluation gains from ``ClassificationEval``, also when the
model has diverged (its answers are abstentions, not a crash) and when there is nothing to score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from producers.config import TinyModel
from producers.task.data import Example
from producers.task.evaluation import ClassificationEval
from producers.task.labels import LabelSet, load_labels
from producers.task.model import build_tiny_model
from producers.task.tokenizer import build_byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [
    Example("I will hurt him tomorrow.", "HIGH_RISK", "Threat.", {}, "t:1"),
    Example("The printer is broken again.", "NO_RISK", "Everyday complaint.", {}, "t:2"),
    Example("Is that a joke or not?", None, "Ambiguous.", {}, "t:3"),
]


@pytest.fixture(scope="module")
def labels() -> LabelSet:
    return load_labels(REPO / "configs/labels.yaml")


def evaluate(callback: ClassificationEval, model: Any, tmp_path: Path) -> dict[str, Any]:
    """What the Trainer does at an evaluation: its own metrics, then every callback's ``on_evaluate``."""
    metrics: dict[str, Any] = {"eval_loss": 1.5}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback.on_evaluate(args, TrainerState(), TrainerControl(), model=model, metrics=metrics)
    return metrics


def test_a_diverged_model_is_scored_as_abstaining_on_every_example(labels: LabelSet, tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(TinyModel(hidden_size=32, num_hidden_layers=1, intermediate_size=64), tokenizer, 0)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    model.train()  # as the Trainer leaves it between steps
    callback = ClassificationEval(EXAMPLES, tokenizer, labels, "Classify.", batch_size=2, max_length=128)
    metrics = evaluate(callback, model, tmp_path)
    assert metrics["eval_loss"] == 1.5  # the Trainer's own metrics stay
    assert metrics["eval_abstain_rate"] == 1.0 and metrics["eval_accuracy"] == 0.0
    assert metrics["eval_num_samples"] == len(EXAMPLES)
    assert model.training  # evaluation put it back into training mode


def test_without_validation_examples_the_trainer_metrics_are_left_alone(labels: LabelSet, tmp_path: Path) -> None:
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(TinyModel(hidden_size=32, num_hidden_layers=1, intermediate_size=64), tokenizer, 0)
    callback = ClassificationEval([], tokenizer, labels, "Classify.", batch_size=2, max_length=128)
    assert evaluate(callback, model, tmp_path) == {"eval_loss": 1.5}
