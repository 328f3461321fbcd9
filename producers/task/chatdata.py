"""Conversations for chat fine-tuning (``data.task: chat``): JSONL rows and a small sample set.

One conversation per line, in either of the two shapes people bring::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}                       # OpenAI
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}   # ShareGPT

Both become a list of ``{"role", "content"}`` messages (ShareGPT's ``human``/``gpt`` are
``user``/``assistant``). Every conversation needs at least one assistant turn: that is what
the model learns to write (``producers.task.chat``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.task.data import RowError, json_type
from producers.task.sampledata import write_splits

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"tool": "tool", "function_call": "assistant", "observation": "tool"}


@dataclass(frozen=True)
class Conversation:
    """One conversation; ``messages`` are ``{"role": ..., "content": ...}`` in order."""

    messages: list[dict[str, str]]
    source: str
    """Where the row came from, ``path:line``."""


def parse_conversation(obj: Any, where: str) -> Conversation:
    """A ``Conversation`` from one JSON row (either shape); ``RowError`` names the bad field."""
    if not isinstance(obj, dict):
        raise RowError(f"expected a JSON object, got {json_type(obj)}")
    if "messages" in obj:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in obj:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise RowError("field 'messages': required (or 'conversations' in the ShareGPT shape)")
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}': expected a non-empty array, got {json_type(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{key}.{i}"
        if not isinstance(turn, dict):
            raise RowError(f"field '{field}': expected an object, got {json_type(turn)}")
        role, text = turn.get(role_key), turn.get(text_key)
        if role not in roles:
            raise RowError(f"field '{field}.{role_key}': {json.dumps(role)} is not one of {', '.join(roles)}")
        if not isinstance(text, str):
            raise RowError(f"field '{field}.{text_key}': expected a string, got {json_type(text)}")
        messages.append({"role": roles[role], "content": text})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError(f"field '{key}': no assistant turn with text (nothing to learn)")
    return Conversation(messages, where)


# ---- a sample set ------------------------------------------------------------------------

SYSTEM = "You are a concise assistant."
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"), ("open", "closed"),
    ("light", "dark"), ("up", "down"), ("full", "empty"), ("new", "old"), ("happy", "sad"),
    ("hard", "soft"), ("loud", "quiet"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"),
)  # fmt: skip
_NAMES = ("Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Noor", "Oli")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")


def _sample(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(3)
    if kind == 0:
        word, other = rng.choice(_OPPOSITES)
        if rng.random() < 0.5:
            word, other = other, word
        turns = [("user", f"What is the opposite of {word}?"), ("assistant", f"The opposite of {word} is {other}.")]
    elif kind == 1:
        first, second = rng.sample(_NAMES, 2)
        turns = [
            ("user", f"Say hello to {first}."),
            ("assistant", f"Hello, {first}!"),
            ("user", f"And to {second}?"),
            ("assistant", f"Hello, {second}!"),
        ]
    else:
        colour = rng.choice(_COLOURS)
        turns = [("user", f"Spell the word {colour}."), ("assistant", "-".join(colour.upper()))]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    return {"messages": messages + [{"role": role, "content": text} for role, text in turns]}


def write_chat_sample(out_dir: Path, seed: int = 0, n_train: int = 400, n_eval: int = 40) -> dict[str, Path]:
    """Write train/validation/test conversation JSONL files under ``out_dir``; same seed, same bytes."""
    rng = random.Random(seed)
    counts = {"train": n_train, "validation": n_eval, "test": n_eval}
    return write_splits(out_dir, {split: [_sample(rng) for _ in range(n)] for split, n in counts.items()})
