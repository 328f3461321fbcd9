"""The rationale of an answer: the model goes on writing its JSON answer after the decision, greedily,
for a bounded number of tokens, and the string it writes is the rationale.

The trained answer is ``{"decision": <label>, "rationale": "<text>", "abstain": <bool>}``, so after
the prompt, the decision and ``, "rationale": "`` the model writes the rationale and closes it with
a quote. Generation stops at that quote, at end-of-sequence, or after ``max_new_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from producers.task.evaluation import left_padded

RATIONALE_PREFIX = ', "rationale": "'
"""What follows the decision in a trained answer, up to where the rationale begins."""


def rationale_prefix(prompt: str, decision: str | None) -> str:
    """The text the model continues to write the rationale of ``decision`` (``prompt`` ends with the answer prefix)."""
    return prompt + json.dumps(decision) + RATIONALE_PREFIX


def string_value(raw: str) -> tuple[str, bool]:
    """(the JSON string body of ``raw`` up to its first unescaped quote, unescaped; whether the quote came)."""
    escaped = False
    for i, char in enumerate(raw):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return _unescape(raw[:i]), True
    return _unescape(raw), False


def _unescape(body: str) -> str:
    try:
        value = json.loads(f'"{body}"')
    except ValueError:  # cut inside an escape sequence: keep the text as written
        return body.strip()
    return str(value).strip()


@torch.no_grad()
def generate_rationales(model: Any, tokenizer: Any, prefixes: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prefix up to its closing quote; one batched pass per new token."""
    if not prefixes:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prefixes]
    input_ids, mask, positions = left_padded(ids, pad)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
    )
    written: list[list[int]] = [[] for _ in ids]
    open_rows = set(range(len(ids)))
    last = positions[:, -1:]
    for _ in range(max_new_tokens):
        chosen = out.logits[:, -1, :].argmax(-1).cpu()
        for i in sorted(open_rows):
            token = int(chosen[i])
            if token == tokenizer.eos_token_id:
                open_rows.discard(i)
                continue
            written[i].append(token)
            if string_value(tokenizer.decode(written[i]))[1]:
                open_rows.discard(i)
        if not open_rows:
            break
        mask = torch.cat([mask, torch.ones((len(ids), 1), dtype=torch.long)], 1)
        last = last + 1
        out = model(
            input_ids=chosen[:, None].to(device),
            attention_mask=mask.to(device),
            position_ids=last.to(device),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return [string_value(tokenizer.decode(row))[0] for row in written]
