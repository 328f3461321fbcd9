"""Examples → token ids for causal-LM fine-tuning, with the loss on the answer only.

A request may come with the text alone, so training leaves the metadata lines out of a share of
the prompts (``data.metadata_dropout``), drawn anew each epoch: over the epochs the model sees
most examples both ways and answers either request alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.task.data import Example, answer_json, build_prompt

IGNORE_INDEX = -100


def encode(example: Example, tokenizer: Any, system_prompt: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + answer + eos; ``labels`` masks the prompt so only the answer is learned.

    Prompt and answer are tokenised separately (so the boundary is exact for any tokenizer); an
    over-long prompt is cut from the left so the answer always fits.
    """
    prompt_ids: list[int] = tokenizer(build_prompt(example, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids: list[int] = tokenizer(answer_json(example), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    room = max_length - len(answer_ids)
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    ids = prompt_ids + answer_ids
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def text_only(example: Example) -> Example:
    """``example`` as a request with the text alone would bring it: no metadata lines."""
    return dataclasses.replace(example, metadata={})


class EncodedDataset(Dataset[dict[str, list[int]]]):
    """A list of encoded examples, encoded once up front.

    With ``metadata_dropout`` > 0, each epoch (``set_epoch``) draws which examples leave their
    metadata lines out: about that share of those that have any, the same draw for the same
    ``seed`` and epoch (so a resumed run sees what an uninterrupted one would).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        system_prompt: str,
        max_length: int,
        *,
        metadata_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.items = [encode(ex, tokenizer, system_prompt, max_length) for ex in examples]
        self.bare = {
            i: encode(text_only(ex), tokenizer, system_prompt, max_length)
            for i, ex in enumerate(examples)
            if ex.metadata and metadata_dropout > 0
        }
        self.metadata_dropout = metadata_dropout
        self.seed = seed
        self.dropped: frozenset[int] = frozenset()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the examples that go without their metadata in ``epoch``."""
        draw = np.random.default_rng([self.seed, epoch]).random(len(self.items)) < self.metadata_dropout
        self.dropped = frozenset(i for i in self.bare if draw[i])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.bare[index] if index in self.dropped else self.items[index]


class EpochDraws(TrainerCallback):
    """Tells the training set which epoch begins, on every rank and also on a resumed run (the
    data loader does not always pass the epoch on to the dataset)."""

    def __init__(self, dataset: EncodedDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.dataset.set_epoch(math.floor(state.epoch or 0))


class PadCollator:
    """Right-pads a batch: pad token for inputs, 0 for the mask, -100 for labels."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([item[key] + [pad] * (width - len(item[key])) for item in batch], dtype=torch.long)
            for key, pad in fill.items()
        }
