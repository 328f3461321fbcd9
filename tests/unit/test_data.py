"""JSONL data: rows become examples, bad rows name file:line and field, prompt + answer is the sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producers.task.data import (
    ANSWER_PREFIX,
    Example,
    answer_json,
    build_prompt,
    data_fingerprint,
    default_rationale,
    read_examples,
)
from producers.task.labels import LabelSet, load_labels
from runtime.errors import ConfigError

LABELS_YAML = Path(__file__).resolve().parents[2] / "configs" / "labels.yaml"
SYSTEM = "Classify the risk of the text."


@pytest.fixture
def labels() -> LabelSet:
    return load_labels(LABELS_YAML)


def write_lines(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_ROW = json.dumps({"text": "I will hurt you tonight", "label": "HIGH_RISK"})


def test_rows_become_examples_with_source_and_defaults(tmp_path: Path, labels: LabelSet) -> None:
    path = write_lines(
        tmp_path,
        [
            json.dumps(
                {
                    "text": "I will hurt you",
                    "label": "HIGH_RISK",
                    "rationale": "Threat.",
                    "metadata": {"channel": "chat"},
                }
            ),
            "",
            "   ",
            json.dumps({"text": "maybe a joke?", "label": None}),
        ],
    )
    examples, skipped = read_examples(path, labels)
    assert skipped == 0
    assert examples[0] == Example("I will hurt you", "HIGH_RISK", "Threat.", {"channel": "chat"}, f"{path}:1")
    assert examples[1].label is None
    assert examples[1].source == f"{path}:4"  # blank lines are skipped but still counted as lines
    assert examples[1].rationale == default_rationale(None) == "The text is ambiguous; abstaining."
    assert examples[1].metadata == {}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"text": "x", "label": ', r":2: invalid JSON: "),
        ('{"label": "HIGH_RISK"}', r":2: field 'text': required \("),
        ('{"text": "", "label": "HIGH_RISK"}', r":2: field 'text': must not be empty"),
        ('{"text": 5, "label": "HIGH_RISK"}', r":2: field 'text': expected a string, got number"),
        ('{"text": "hello there"}', r":2: field 'label': required"),
        (
            '{"text": "hello there", "label": "FOO"}',
            r":2: field 'label': 'FOO' is not one of HIGH_RISK, MEDIUM_RISK, LOW_RISK, NO_RISK \(or null to abstain\) \(",
        ),
        ('{"text": "hello there", "label": "NO_RISK", "lable": 1}', r":2: field 'lable': unknown key"),
        ('{"text": "hi there", "label": "NO_RISK", "metadata": {"a": [1]}}', r":2: field 'metadata.a': expected"),
        ('{"text": "hi there", "label": "NO_RISK", "rationale": 3}', r":2: field 'rationale': expected a string"),
        ('["text", "label"]', r":2: expected a JSON object, got array"),
        ('{"text": "hi there", "label": "NO_RISK", "metadata": [1]}', r":2: field 'metadata': expected an object, got"),
        ('{"text": "hi there", "label": 7}', r":2: field 'label': 7 is not one of HIGH_RISK"),
        ('{"text": "   ", "label": "NO_RISK", "lable": 1}', r":2: field 'lable': unknown key"),  # unknown keys first
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path: Path, labels: LabelSet, row: str, message: str) -> None:
    path = write_lines(tmp_path, [GOOD_ROW, row])
    with pytest.raises(ConfigError, match=message) as info:
        read_examples(path, labels)
    assert str(info.value).startswith(f"{path}:2: ")
    assert str(info.value).endswith("(set data.skip_invalid=true to skip bad rows instead)")
    assert "\n" not in str(info.value)


def test_metadata_values_keep_their_json_types(tmp_path: Path, labels: LabelSet) -> None:
    row = {"text": "hi there", "label": None, "metadata": {"vip": True, "score": 1.5, "n": 2, "lang": "en"}}
    path = write_lines(tmp_path, [json.dumps(row), json.dumps({**row, "metadata": None})])
    examples, _ = read_examples(path, labels)
    assert examples[0].metadata == {"vip": True, "score": 1.5, "n": 2, "lang": "en"}
    assert [type(v) for v in examples[0].metadata.values()] == [bool, float, int, str]
    assert examples[1].metadata == {}


def test_skip_invalid_skips_and_counts(tmp_path: Path, labels: LabelSet) -> None:
    rows = [GOOD_ROW, "not json", '{"text": "x", "label": "FOO"}', '{"label": null}', GOOD_ROW]
    path = write_lines(tmp_path, rows)
    examples, skipped = read_examples(path, labels, skip_invalid=True)
    assert skipped == 3
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:5"]


def test_invalid_utf8_row_is_skippable(tmp_path: Path, labels: LabelSet) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD_ROW.encode() + b"\n" + b'{"text": "\xff\xfe", "label": null}\n')
    with pytest.raises(ConfigError, match=r":2: not UTF-8"):
        read_examples(path, labels)
    assert read_examples(path, labels, skip_invalid=True)[1] == 1


def test_missing_and_empty_files(tmp_path: Path, labels: LabelSet) -> None:
    with pytest.raises(ConfigError, match=r"nope.jsonl: no such data file$"):
        read_examples(tmp_path / "nope.jsonl", labels)
    empty = write_lines(tmp_path, ["", "  "])
    with pytest.raises(ConfigError, match=r"data.jsonl: no examples$"):
        read_examples(empty, labels)
    all_bad = write_lines(tmp_path, ["nope", "{}"], name="bad.jsonl")
    with pytest.raises(ConfigError, match=r"bad.jsonl: no examples \(2 invalid rows skipped\)"):
        read_examples(all_bad, labels, skip_invalid=True)


def test_answer_json_is_exact_and_starts_with_prefix() -> None:
    labelled = Example("I will hurt you", "HIGH_RISK", "Threat.", {}, "x:1")
    assert answer_json(labelled) == '{"decision": "HIGH_RISK", "rationale": "Threat.", "abstain": false}'
    ambiguous = Example("joke?", None, "Unclear.", {}, "x:2")
    assert answer_json(ambiguous) == '{"decision": null, "rationale": "Unclear.", "abstain": true}'
    assert answer_json(labelled).startswith(ANSWER_PREFIX)
    assert answer_json(ambiguous).startswith(ANSWER_PREFIX)
    assert json.loads(answer_json(labelled))["decision"] == "HIGH_RISK"


def test_prompt_layout_is_deterministic_and_answer_follows_it() -> None:
    ex = Example("Line one", "LOW_RISK", "Rude.", {"lang": "en", "channel": "chat", "score": 1.5, "vip": True}, "x:1")
    prompt = build_prompt(ex, SYSTEM)
    assert prompt == (f"{SYSTEM}\nchannel: chat\nlang: en\nscore: 1.5\nvip: true\nText: Line one\nAnswer: ")
    # metadata insertion order does not change the prompt
    reordered = Example(ex.text, ex.label, ex.rationale, dict(reversed(list(ex.metadata.items()))), ex.source)
    assert build_prompt(reordered, SYSTEM) == prompt
    sequence = prompt + answer_json(ex)
    assert sequence[len(prompt) :] == answer_json(ex)
    bare = build_prompt(Example("Line one", None, "r", {}, "x:1"), SYSTEM)
    assert bare == f"{SYSTEM}\nText: Line one\nAnswer: "
    assert prompt.endswith(bare.removeprefix(SYSTEM))  # with or without metadata, the text ends the prompt alike


def test_fingerprint_tracks_content_and_order_not_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "train.jsonl").write_text("one\n")
        (tmp_path / folder / "test.jsonl").write_text("two\n")
    a = [tmp_path / "a" / "train.jsonl", tmp_path / "a" / "test.jsonl"]
    b = [tmp_path / "b" / "train.jsonl", tmp_path / "b" / "test.jsonl"]
    fingerprint = data_fingerprint(a)
    assert len(fingerprint) == 64
    assert data_fingerprint(b) == fingerprint
    assert data_fingerprint(list(reversed(a))) != fingerprint
    (tmp_path / "b" / "test.jsonl").write_text("two!\n")
    assert data_fingerprint(b) != fingerprint
    with pytest.raises(ConfigError, match="no such data file"):
        data_fingerprint([tmp_path / "missing.jsonl"])
