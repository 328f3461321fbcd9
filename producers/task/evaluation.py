"""Classification metrics from the model's probabilities over the label set, at every evaluation.

The model answers ``{"decision": <label or null>, ...}``; the probability of each label is the
likelihood of its JSON string (``"HIGH_RISK"``, …, ``null``) right after the prompt and
``ANSWER_PREFIX``, normalised over the options. ``ClassificationEval`` adds the metrics to the
Trainer's evaluation metrics so every ``eval`` event carries them, and measures the requests
serving gets with the text alone too (``text_only_accuracy``, ``text_only_abstain_rate``). The
predictor serves the same ``classifier_prompt`` and ``label_probabilities``, so an answer on the
bus is an evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from producers.task.data import ANSWER_PREFIX, Example, build_prompt
from producers.task.encoding import text_only
from producers.task.labels import LabelSet
from producers.task.metrics import classification_metrics


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) of ``rows`` padded on the left, so every row ends
    at the last column, where what follows it (the options, generated tokens) begins."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def option_probabilities(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> np.ndarray:
    """``(len(prompts), len(options))`` probabilities of each option continuing each prompt.

    Each prompt runs through the model once (left-padded, with its KV cache); the options then
    continue that cache together. One pass per option would cost ``len(options)`` times as much.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    option_ids = [tokenizer(opt, add_special_tokens=False)["input_ids"] for opt in options]
    n_opt, opt_width = len(options), max(len(ids) for ids in option_ids)
    cont = torch.full((n_opt, opt_width), pad, dtype=torch.long)
    cont_mask = torch.zeros((n_opt, opt_width), dtype=torch.long)
    for j, ids in enumerate(option_ids):
        cont[j, : len(ids)] = torch.tensor(ids)
        cont_mask[j, : len(ids)] = 1
    keep = prompt_token_limit(opt_width, max_length)
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"][-keep:] for prompt in prompts]
    scores = np.zeros((len(prompts), n_opt))
    for start in range(0, len(prompts), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        input_ids, mask, positions = left_padded(chunk, pad)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
        )
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # the options' first tokens
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_opt)  # row i*n_opt + j: prompt i, option j
        cont_positions = positions[:, -1:].repeat_interleave(n_opt, 0) + 1 + torch.arange(opt_width)
        following = model(
            input_ids=cont.repeat(len(chunk), 1).to(device),
            attention_mask=torch.cat([mask.repeat_interleave(n_opt, 0), cont_mask.repeat(len(chunk), 1)], 1).to(device),
            position_ids=cont_positions.to(device),
            past_key_values=cache,
            use_cache=True,
        ).logits.float()
        following = torch.log_softmax(following, dim=-1).view(len(chunk), n_opt, opt_width, -1)
        # option j scores first[its token 0] + following[position t, its token t+1] over its real tokens;
        # gathered at once (an .item() per cell costs more than the model on a batch of short prompts)
        nexts = cont[:, 1:].to(device).expand(len(chunk), n_opt, opt_width - 1)
        steps = following[:, :, :-1, :].gather(-1, nexts.unsqueeze(-1)).squeeze(-1)
        padding = (cont_mask[:, 1:] == 0).to(device)
        total = first[:, cont[:, 0].to(device)] + steps.masked_fill(padding, 0.0).sum(-1)
        scores[start : start + len(chunk)] = total.double().cpu().numpy()
    grid = np.exp(scores - scores.max(axis=1, keepdims=True))
    return grid / grid.sum(axis=1, keepdims=True)


def prompt_token_limit(option_tokens: int, max_length: int) -> int:
    """How many prompt tokens are scored: the prompt's tail that leaves room for the longest option."""
    return max(1, max_length - option_tokens)


def answer_options(labels: LabelSet) -> list[str]:
    """The continuations scored after the prompt: each label as a JSON string, then ``null`` (abstain)."""
    return [json.dumps(name) for name in labels.names] + ["null"]


def classifier_prompt(example: Example, system_prompt: str) -> str:
    """What the model reads before writing its decision: the training prompt plus ``ANSWER_PREFIX``."""
    return build_prompt(example, system_prompt) + ANSWER_PREFIX


def label_probabilities(
    model: Any, tokenizer: Any, prompts: Sequence[str], labels: LabelSet, *, batch_size: int, max_length: int
) -> np.ndarray:
    """``(len(prompts), labels + 1)`` probabilities of each label and of ``null``, row by row.

    A row the model cannot score (a diverged model: NaN) is all ``null``, so it counts as an
    abstention instead of breaking the metrics.
    """
    was_training = model.training
    if was_training:  # switching walks every module: a served model in eval mode skips it
        model.eval()
    try:
        probs = option_probabilities(
            model, tokenizer, prompts, answer_options(labels), batch_size=batch_size, max_length=max_length
        )
    finally:
        if was_training:
            model.train()
    broken = ~np.isfinite(probs).all(axis=1)
    if broken.any():
        probs[broken] = 0.0
        probs[broken, -1] = 1.0
    return probs


def evaluate_classifier(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: LabelSet,
    system_prompt: str,
    *,
    batch_size: int,
    max_length: int,
) -> dict[str, Any]:
    """Classification metrics of ``model`` on ``examples`` (see ``producers.task.metrics``), plus
    ``text_only_accuracy`` and ``text_only_abstain_rate``: the same examples asked with the text
    alone (scored again only when some example has metadata; else they are the same requests)."""

    def measure(rows: Sequence[Example]) -> dict[str, Any]:
        prompts = [classifier_prompt(ex, system_prompt) for ex in rows]
        probs = label_probabilities(model, tokenizer, prompts, labels, batch_size=batch_size, max_length=max_length)
        return classification_metrics(probs, [ex.label for ex in rows], labels)

    full = measure(examples)
    bare = measure([text_only(ex) for ex in examples]) if any(ex.metadata for ex in examples) else full
    return {**full, "text_only_accuracy": bare["accuracy"], "text_only_abstain_rate": bare["abstain_rate"]}


class ClassificationEval(TrainerCallback):
    """Adds ``eval_accuracy``, ``eval_macro_f1``, … to the metrics of every Trainer evaluation."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: LabelSet,
        system_prompt: str,
        *,
        batch_size: int,
        max_length: int,
    ) -> None:
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.labels = labels
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.max_length = max_length

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model, metrics = kwargs.get("model"), kwargs.get("metrics")
        if model is None or metrics is None or not state.is_world_process_zero or not self.examples:
            return
        result = evaluate_classifier(
            model,
            self.tokenizer,
            self.examples,
            self.labels,
            self.system_prompt,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        metrics.update({f"eval_{key}": value for key, value in result.items()})
