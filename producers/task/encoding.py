"""Examples → token ids for causal-LM fine-tuning, with the loss on the answer only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

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


class EncodedDataset(Dataset[dict[str, list[int]]]):
    """A list of encoded examples, encoded once up front."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, system_prompt: str, max_length: int) -> None:
        self.items = [encode(ex, tokenizer, system_prompt, max_length) for ex in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


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
