"""Chat fine-tuning (``data.task: chat``): conversations through the tokenizer's chat template,
the loss on the assistant turns only, and perplexity at every evaluation.

A conversation is rendered once with ``tokenizer.apply_chat_template``; the characters of each
assistant turn are found by rendering the conversation up to that turn with and without it,
and the tokens that start inside them are the labels (every other token is ``-100``). This
works with any template that renders a conversation turn by turn, which is what chat templates
do; one that does not is refused with one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.task.chatdata import Conversation
from producers.task.encoding import IGNORE_INDEX
from runtime.errors import ConfigError


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) characters of each assistant turn in it."""
    text = _render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], generation_prompt=True) if k else ""
        through = _render(tokenizer, messages[: k + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError(
                "data.chat_template: the chat template does not render a conversation turn by turn, so the "
                "assistant turns cannot be found (set data.chat_template to one that does)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(conversation: Conversation, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids of the rendered conversation; ``labels`` keeps the assistant turns' tokens only.

    Longer than ``max_length``: the start is kept, unless that leaves no assistant token to
    learn; then the end is kept.
    """
    text, spans = assistant_spans(tokenizer, conversation.messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    if len(ids) > max_length:
        keep = slice(0, max_length)
        if all(label == IGNORE_INDEX for label in labels[keep]):
            keep = slice(len(ids) - max_length, len(ids))
        ids, labels = ids[keep], labels[keep]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def use_chat_template(tokenizer: Any, template: str | None) -> None:
    """Give ``tokenizer`` the config's template, or check it has one of its own."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.chat_template: the tokenizer has no chat template; set one (a Jinja template over `messages`)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.task: chat needs a fast tokenizer (it maps the assistant turns' characters to tokens)")


class ChatDataset(Dataset[dict[str, list[int]]]):
    """Conversations encoded once up front (see ``encode_conversation``)."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Any, max_length: int) -> None:
        self.items = [encode_conversation(c, tokenizer, max_length) for c in conversations]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class Perplexity(TrainerCallback):
    """Adds ``eval_perplexity`` (exp of the eval loss per assistant token) to every evaluation."""

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        metrics = kwargs.get("metrics")
        if metrics is None or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        metrics["eval_perplexity"] = (
            math.inf if loss > 700 else math.exp(loss)
        )  # exp overflows past ~709; NaN stays NaN
