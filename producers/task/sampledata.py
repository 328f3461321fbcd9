"""A small deterministic risk-assessment data set, so a run works with no data of its own.

``write_sample_data(out_dir)`` writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``
(the format ``producers.task.data`` reads). Texts come from label-specific templates with slot
fillers; every (template, filler, filler) combination of two chosen slots belongs to exactly one
split, so validation and test texts are new combinations of words seen in training, never
copies, and no text appears in two splits. Most texts are a sentence or two; a few templates are
the short lines people type ("I will hurt her tonight."). About 5% of rows are ambiguous
(``label: null``: the right answer is to abstain). Same seed, same bytes.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")
CHANNELS = ("chat", "email", "forum")
AMBIGUOUS_SHARE = 0.05
MIN_CHARS, MAX_CHARS = 12, 140


@dataclass(frozen=True)
class _Template:
    label: str | None
    pattern: str
    pair: tuple[str, str]
    """Two slots: each (template, filler, filler) combination belongs to exactly one split."""
    rationale: str


# fmt: off
_FILLERS: dict[str, tuple[str, ...]] = {
    "person": (
        "my neighbour", "my boss", "my ex", "that teacher", "the landlord",
        "my coworker", "the new guy", "my roommate", "his brother", "the manager",
    ),
    "when": ("today", "tonight", "tomorrow", "this weekend", "on Friday", "after work", "next week", "this morning"),
    "place": (
        "the mall", "the school", "the office", "the train station",
        "the park", "the stadium", "the market", "the church",
    ),
    "event": ("the party", "the game", "work", "the wedding", "the concert", "the bar"),
    # HIGH_RISK
    "harm": ("kill", "shoot", "stab", "strangle", "murder", "hunt down", "gun down", "kill and bury"),
    "weapon": ("gun", "knife", "rifle", "pistol", "machete", "shotgun", "crossbow", "loaded handgun"),
    "selfharm": (
        "end my life", "kill myself", "take all my pills", "jump off the bridge",
        "overdose", "hurt myself badly", "cut myself deeply", "end it all",
    ),
    "device": ("bomb", "pipe bomb", "explosive", "detonator", "car bomb", "nail bomb", "fire bomb", "timed bomb"),
    # MEDIUM_RISK
    "harass": (
        "following me home", "sending me creepy messages", "posting my photos online",
        "calling me names at work", "showing up at my door", "spreading lies about me",
        "messaging me at 3am", "tracking my location",
    ),
    "veiled": (
        "watch their back", "be careful walking home alone", "sleep with one eye open",
        "not get too comfortable", "remember what happened to the last guy", "know that accidents happen",
        "check their brakes", "think twice before going out",
    ),
    "risky": (
        "drive home drunk", "mix pills and alcohol", "take pills from a stranger",
        "go swimming alone in the storm", "race on the highway", "meet a stranger from the internet alone",
        "drive with no brakes", "ride the motorbike without a helmet",
    ),
    # LOW_RISK
    "rude": (
        "a bit rude", "rather impolite", "quite dismissive", "slightly snarky",
        "pretty grumpy", "not very friendly", "a little sarcastic", "kind of short",
    ),
    "thing": (
        "printer", "coffee machine", "wifi", "lift", "heating", "parking gate", "vending machine", "door lock",
    ),
    "concern": (
        "my flight is delayed", "the package is late", "the dog next door barks a lot",
        "the rent might go up", "I forgot to lock the shed", "the meeting runs late",
        "my phone battery is dying", "the milk smells off",
    ),
    "shrug": (
        "probably nothing serious", "not a big deal", "just a small thing",
        "nothing urgent", "it can wait", "no need to panic",
    ),
    # NO_RISK
    "favor": (
        "the lovely dinner", "the birthday card", "your help with the move", "the book tip",
        "the ride home", "lunch", "the great notes", "the flowers",
    ),
    "venue": ("library", "bakery", "museum", "swimming pool", "farmers market", "cinema", "gym", "post office"),
    "food": ("coffee", "a sandwich", "ice cream", "pancakes", "a pizza", "some tea", "a bagel", "noodles"),
    "activity": (
        "picnic", "walk in the park", "board game night", "bike ride",
        "cooking class", "concert", "beach day", "movie night",
    ),
    # short messages: a line or two, as people type them
    "hurt": ("hurt", "kill", "stab", "shoot", "beat up", "strangle", "attack", "choke"),
    "target": ("him", "her", "them", "you", "that guy", "the teacher", "my sister", "the kid"),
    "broken": ("jammed", "broken", "down again", "not working", "out of order", "acting up", "stuck", "very slow"),
    "nice": ("Nice", "Lovely", "Great", "Beautiful", "Sunny", "Perfect", "Pleasant", "Fine"),
    # ambiguous
    "ambig": (
        "you will regret this", "I know where you live", "this is not over", "I will deal with you",
        "you had better be ready", "see what happens", "I will take care of it", "just wait",
    ),
}

_TEMPLATES: tuple[_Template, ...] = (
    _Template("HIGH_RISK", "I am going to {harm} {person} {when}, I mean it.", ("harm", "person"),
              "Explicit threat of violence against a person."),
    _Template("HIGH_RISK", "I bought a {weapon} and I will use it on {person} {when}.", ("weapon", "person"),
              "Mentions a weapon and intent to use it."),
    _Template("HIGH_RISK", "I want to {selfharm} {when}, nobody can stop me now.", ("selfharm", "when"),
              "States intent to self-harm."),
    _Template("HIGH_RISK", "Someone left a {device} at {place}, it goes off {when}, get everyone out!", ("device", "place"),
              "Imminent danger to people."),
    _Template("MEDIUM_RISK", "{person} keeps {harass} and it will not stop.", ("harass", "person"),
              "Describes ongoing harassment."),
    _Template("MEDIUM_RISK", "{person} should {veiled}, that is all I am saying.", ("veiled", "person"),
              "Contains a veiled threat."),
    _Template("MEDIUM_RISK", "Going to {risky} after {event} {when}, what could go wrong.", ("risky", "event"),
              "Describes risky behaviour."),
    _Template("LOW_RISK", "{person} was {rude} to me {when}, kind of annoying.", ("rude", "person"),
              "Mild rudeness, no threat."),
    _Template("LOW_RISK", "Complaint: the {thing} at {place} is broken again, please fix it.", ("thing", "place"),
              "A complaint, no danger."),
    _Template("LOW_RISK", "Slightly worried that {concern}, {shrug}.", ("concern", "shrug"),
              "A minor concern."),
    _Template("NO_RISK", "Thanks for {favor} {when}, see you at {place}!", ("favor", "place"),
              "Friendly everyday message."),
    _Template("NO_RISK", "What time does the {venue} open {when}? Want to grab {food}.", ("venue", "food"),
              "Everyday question, no risk."),
    _Template("NO_RISK", "Had a lovely {activity} with {person} {when}, it was great fun.", ("activity", "person"),
              "Benign everyday text."),
    _Template("HIGH_RISK", "I will {hurt} {target} {when}.", ("hurt", "target"),
              "Explicit threat of violence against a person."),
    _Template("LOW_RISK", "The {thing} is {broken}.", ("thing", "broken"),
              "A complaint, no danger."),
    _Template("NO_RISK", "{nice} weather {when}.", ("nice", "when"),
              "Benign everyday text."),
    _Template(None, "Not sure if {person} was joking when they said '{ambig}' {when}.", ("ambig", "person"),
              "Intent is unclear; cannot decide safely."),
    _Template(None, "Hard to tell what {person} meant by '{ambig}', could be a joke or not.", ("ambig", "person"),
              "Intent is unclear; cannot decide safely."),
)
# fmt: on

LABELS = ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK")
HELD_BACK = frozenset({"I will hurt him tomorrow.", "The printer is jammed.", "Nice weather today."})
"""Texts the README and the Try-it page show as examples: never written to any split, so what a
trained model answers to them is generalisation from the templates, not recall."""


def _split_of(template: int, first: int, second: int, seed: int) -> str:
    """Which split owns a (template, first filler, second filler) combination: 4 in 6 go to train.

    The second slot has at least 6 fillers, so every first filler is seen in training with some
    partners and held out with others.
    """
    slot = (template * 7 + first * 3 + second + seed) % 6
    return "test" if slot == 0 else "validation" if slot == 1 else "train"


def _slots(pattern: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def _label_sequence(rng: random.Random, n: int) -> list[str | None]:
    n_null = round(n * AMBIGUOUS_SHARE)
    seq: list[str | None] = [None] * n_null
    seq += [LABELS[i % len(LABELS)] for i in range(n - n_null)]
    rng.shuffle(seq)
    return seq


def _row(rng: random.Random, label: str | None, split: str, seed: int, seen: set[str]) -> dict[str, object]:
    candidates = [(i, t) for i, t in enumerate(_TEMPLATES) if t.label == label]
    for _ in range(1000):
        index, template = rng.choice(candidates)
        first, second = template.pair
        combos = [
            (i, j)
            for i in range(len(_FILLERS[first]))
            for j in range(len(_FILLERS[second]))
            if _split_of(index, i, j, seed) == split
        ]
        i, j = rng.choice(combos)
        values = {name: rng.choice(_FILLERS[name]) for name in _slots(template.pattern)}
        values[first], values[second] = _FILLERS[first][i], _FILLERS[second][j]
        text = template.pattern.format(**values)
        text = text[0].upper() + text[1:]
        if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            return {
                "text": text,
                "label": label,
                "rationale": template.rationale,
                "metadata": {"channel": rng.choice(CHANNELS)},
            }
    raise RuntimeError(f"sample data: ran out of distinct {label} texts for {split}; lower the row count")


def write_sample_data(
    out_dir: Path, seed: int = 0, n_train: int = 800, n_validation: int = 120, n_test: int = 120
) -> dict[str, Path]:
    """Write train/validation/test JSONL files under ``out_dir``; returns split name -> path.

    Deterministic: the same arguments give byte-identical files. Files are written whole
    (temporary file, then rename), so an interrupted run never leaves a half-written split.
    """
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in counts.items():
        if n < 1:
            raise ValueError(f"n_{split} must be at least 1, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set(HELD_BACK)
    rows = {
        split: [_row(rng, label, split, seed, seen) for label in _label_sequence(rng, counts[split])]
        for split in SPLITS
    }
    return write_splits(out_dir, rows)


def write_splits(out_dir: Path, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Write ``<split>.jsonl`` files under ``out_dir``, each whole (temporary file, then rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, split_rows in rows.items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in split_rows), encoding="utf-8", newline="\n")
        os.replace(tmp, path)
        paths[split] = path
    return paths


def sample_data_exists(out_dir: Path) -> bool:
    """True when all three split files exist and are non-empty."""
    paths = [Path(out_dir) / f"{split}.jsonl" for split in SPLITS]
    return all(path.is_file() and path.stat().st_size > 0 for path in paths)
