"""Training for text-only requests: each epoch a share of the prompts leaves its metadata lines out,
drawn anew per epoch and the same on a resumed run; evaluation measures both kinds of request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from producers.config import DataConfig, TinyModel
from producers.task.data import Example, build_prompt
from producers.task.encoding import EncodedDataset, EpochDraws, encode, text_only
from producers.task.evaluation import ClassificationEval, evaluate_classifier
from producers.task.labels import LabelSet, load_labels
from producers.task.model import build_tiny_model
from producers.task.tokenizer import build_byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "Classify."
LABEL_NAMES = ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK")
EXAMPLES = [
    Example(f"text number {i}", LABEL_NAMES[i % 4], "r", {"channel": "chat"} if i % 5 else {}, f"t:{i}")
    for i in range(200)
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def labels() -> LabelSet:
    return load_labels(REPO / "configs/labels.yaml")


def bare_indices(dataset: EncodedDataset, tokenizer: Any) -> set[int]:
    """Which items the dataset serves without their metadata lines, read from the tokens themselves."""
    full = {i: encode(ex, tokenizer, SYSTEM, 256)["input_ids"] for i, ex in enumerate(EXAMPLES)}
    return {i for i in range(len(dataset)) if dataset[i]["input_ids"] != full[i]}


def test_a_share_of_the_prompts_goes_without_metadata_drawn_anew_each_epoch(tokenizer: Any) -> None:
    dataset = EncodedDataset(EXAMPLES, tokenizer, SYSTEM, 256, metadata_dropout=0.5, seed=42)
    with_metadata = {i for i, ex in enumerate(EXAMPLES) if ex.metadata}
    epochs = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        dropped = bare_indices(dataset, tokenizer)
        assert dropped <= with_metadata  # a row without metadata has nothing to leave out
        assert 0.35 <= len(dropped) / len(with_metadata) <= 0.65
        for i in list(dropped)[:5]:
            assert dataset[i] == encode(text_only(EXAMPLES[i]), tokenizer, SYSTEM, 256)
            assert "channel" not in tokenizer.decode(dataset[i]["input_ids"])
        epochs.append(dropped)
    assert epochs[0] != epochs[1] != epochs[2]  # over the epochs most rows are seen both ways
    again = EncodedDataset(EXAMPLES, tokenizer, SYSTEM, 256, metadata_dropout=0.5, seed=42)
    again.set_epoch(1)
    assert bare_indices(again, tokenizer) == epochs[1]  # same seed and epoch: a resumed run sees the same


def test_no_dropout_keeps_every_prompt_whole_and_the_default_drops_half(tokenizer: Any) -> None:
    dataset = EncodedDataset(EXAMPLES, tokenizer, SYSTEM, 256, metadata_dropout=0.0)
    dataset.set_epoch(3)
    assert bare_indices(dataset, tokenizer) == set()
    assert DataConfig().metadata_dropout == 0.5


def test_each_epoch_that_begins_draws_for_itself(tokenizer: Any, tmp_path: Path) -> None:
    dataset = EncodedDataset(EXAMPLES, tokenizer, SYSTEM, 256, metadata_dropout=0.5, seed=1)
    expected = EncodedDataset(EXAMPLES, tokenizer, SYSTEM, 256, metadata_dropout=0.5, seed=1)
    expected.set_epoch(2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(epoch=2.0)  # as the Trainer's state reads when epoch 2 begins, also after a resume
    EpochDraws(dataset).on_epoch_begin(args, state, TrainerControl())
    assert dataset.dropped == expected.dropped
    state.epoch = 2.5  # resumed in the middle of epoch 2
    EpochDraws(dataset).on_epoch_begin(args, state, TrainerControl())
    assert dataset.dropped == expected.dropped


def test_evaluation_also_measures_the_text_alone(tokenizer: Any, labels: LabelSet, tmp_path: Path) -> None:
    model = build_tiny_model(TinyModel(hidden_size=32, num_hidden_layers=1, intermediate_size=64), tokenizer, 0)
    rows = EXAMPLES[:12]
    callback = ClassificationEval(rows, tokenizer, labels, SYSTEM, batch_size=4, max_length=128)
    metrics: dict[str, Any] = {}
    callback.on_evaluate(TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True), TrainerState(),
                         TrainerControl(), model=model, metrics=metrics)  # fmt: skip
    alone = evaluate_classifier(
        model, tokenizer, [text_only(ex) for ex in rows], labels, SYSTEM, batch_size=4, max_length=128
    )
    assert metrics["eval_text_only_accuracy"] == alone["accuracy"]
    assert metrics["eval_text_only_abstain_rate"] == alone["abstain_rate"]
    assert build_prompt(rows[1], SYSTEM) != build_prompt(text_only(rows[1]), SYSTEM)
    # without any metadata the two requests are one: the same figures, scored once
    plain = evaluate_classifier(
        model, tokenizer, [text_only(ex) for ex in rows], labels, SYSTEM, batch_size=4, max_length=128
    )
    assert (plain["text_only_accuracy"], plain["text_only_abstain_rate"]) == (plain["accuracy"], plain["abstain_rate"])
