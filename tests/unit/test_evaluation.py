"""Option scoring with one pass per prompt gives the probabilities of one pass per (prompt, option)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from producers.config import TinyModel
from producers.task.data import ANSWER_PREFIX
from producers.task.evaluation import option_probabilities
from producers.task.model import build_tiny_model
from producers.task.tokenizer import build_byte_tokenizer

OPTIONS = [json.dumps(name) for name in ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK")] + ["null"]
PROMPTS = [
    "short" + ANSWER_PREFIX,
    "a somewhat longer prompt about a loan application" + ANSWER_PREFIX,
    "x" + ANSWER_PREFIX,
    "ünïcödé and 🙂, so several bytes per character" + ANSWER_PREFIX,
    "the fifth prompt" + ANSWER_PREFIX,
]


@torch.no_grad()
def one_pass_per_option(model: Any, tokenizer: Any, prompts: list[str], options: list[str]) -> np.ndarray:
    """The plain definition: log P(option | prompt) from a full pass over prompt + option, then softmax."""
    scores = np.zeros((len(prompts), len(options)))
    for i, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for j, option in enumerate(options):
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + option_ids])
            logprobs = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
            start = len(prompt_ids)
            scores[i, j] = sum(logprobs[start + k - 1, t].item() for k, t in enumerate(option_ids))
    grid = np.exp(scores - scores.max(axis=1, keepdims=True))
    return grid / grid.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "glm4"])
def test_shared_prompt_scoring_matches_one_pass_per_option(architecture: str) -> None:
    tokenizer = build_byte_tokenizer()
    tiny = TinyModel(
        architecture=architecture,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    model = build_tiny_model(tiny, tokenizer, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large weights: a fresh init predicts almost the same bytes whatever the context
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    # a LoRA adapter with non-zero B, as in a trained run: scoring goes through peft's forward too
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = np.log(one_pass_per_option(model, tokenizer, PROMPTS, OPTIONS))
    got = option_probabilities(model, tokenizer, PROMPTS, OPTIONS, batch_size=3, max_length=256)
    assert got.shape == (len(PROMPTS), len(OPTIONS))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.log(got), expected, atol=1e-4)  # log space: no saturated 0s and 1s
    spread = expected - expected[:, -1:]  # each option against "null", prompt by prompt
    assert np.ptp(spread, axis=0).max() > 0.1  # the prompt changes the answer: the comparison means something
