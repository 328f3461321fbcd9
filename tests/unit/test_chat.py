"""Chat rows in both shapes people bring, and the loss on the assistant turns only: the tokens that
are learned are exactly what the assistant wrote (and the end of its turn), nothing of the prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from producers.task.chat import Perplexity, encode_conversation, use_chat_template
from producers.task.chatdata import Conversation, parse_conversation, write_chat_sample
from producers.task.data import read_jsonl
from producers.task.encoding import IGNORE_INDEX
from producers.task.tokenizer import build_byte_tokenizer
from runtime.errors import ConfigError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi to Ana."},
    {"role": "assistant", "content": "Hi, Ana!"},
    {"role": "user", "content": "And to Bo?"},
    {"role": "assistant", "content": "Hi, Bo!"},
]


def learned(ids: list[int], labels: list[int], tokenizer: object) -> list[str]:
    """The stretches of text whose tokens carry a label."""
    runs: list[list[int]] = []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if runs and runs[-1]:
                runs.append([])
            continue
        assert label == token
        if not runs:
            runs.append([])
        runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs if run]  # type: ignore[attr-defined]


def test_only_the_assistant_turns_are_learned() -> None:
    tokenizer = build_byte_tokenizer()
    encoded = encode_conversation(Conversation(MESSAGES, "t:1"), tokenizer, max_length=512)
    assert learned(encoded["input_ids"], encoded["labels"], tokenizer) == ["Hi, Ana!</s>\n", "Hi, Bo!</s>\n"]
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])


def test_a_long_conversation_keeps_something_to_learn() -> None:
    tokenizer = build_byte_tokenizer()
    long = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    encoded = encode_conversation(Conversation(long, "t:1"), tokenizer, max_length=64)
    assert len(encoded["input_ids"]) == 64
    assert learned(encoded["input_ids"], encoded["labels"], tokenizer) == ["ok</s>\n"]


def test_sharegpt_rows_read_as_messages() -> None:
    row = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    conversation = parse_conversation(row, "f:1")
    assert conversation.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hi"}, "field 'messages': required (or 'conversations' in the ShareGPT shape)"),
        ({"messages": []}, "field 'messages': expected a non-empty array, got array"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages.0.role': \"robot\" is not one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "field 'messages.0.content': expected a string, got number"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn with text"),
    ],
)
def test_a_bad_row_names_file_line_field_and_the_skip_setting(tmp_path: Path, row: object, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ConfigError) as info:
        read_jsonl(path, parse_conversation)
    text = str(info.value)
    assert text.startswith(f"{path}:2: {message}") and text.endswith(
        "(set data.skip_invalid=true to skip bad rows instead)"
    )
    rows, skipped = read_jsonl(path, parse_conversation, skip_invalid=True)
    assert (len(rows), skipped) == (1, 1)


def test_a_tokenizer_without_a_chat_template_is_told_what_to_set() -> None:
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"^data.chat_template: the tokenizer has no chat template"):
        use_chat_template(tokenizer, None)
    use_chat_template(tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tokenizer.chat_template


def test_perplexity_is_the_exponential_of_the_eval_loss(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for loss, expected in ((0.5, math.exp(0.5)), (800.0, math.inf)):
        metrics = {"eval_loss": loss}
        Perplexity().on_evaluate(args, TrainerState(), TrainerControl(), metrics=metrics)
        assert metrics["eval_perplexity"] == pytest.approx(expected)
    metrics = {"eval_loss": math.nan}
    Perplexity().on_evaluate(args, TrainerState(), TrainerControl(), metrics=metrics)
    assert math.isnan(metrics["eval_perplexity"])


def test_the_sample_set_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    first = write_chat_sample(tmp_path / "a", seed=3)
    second = write_chat_sample(tmp_path / "b", seed=3)
    assert first["train"].read_bytes() == second["train"].read_bytes()
    rows, skipped = read_jsonl(first["validation"], parse_conversation)
    assert skipped == 0 and len(rows) == 40
