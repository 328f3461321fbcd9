"""The sample data set: deterministic, disjoint held-out splits, every row readable with the real labels."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from producers.task.data import read_examples
from producers.task.labels import load_labels
from producers.task.sampledata import HELD_BACK, MAX_CHARS, MIN_CHARS, sample_data_exists, write_sample_data

LABELS_YAML = Path(__file__).resolve().parents[2] / "configs" / "labels.yaml"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample_data(tmp_path_factory.mktemp("sample"))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_data(sample: dict[str, Path], tmp_path: Path) -> None:
    again = write_sample_data(tmp_path / "again")
    other = write_sample_data(tmp_path / "other", seed=1)
    for split, path in sample.items():
        assert again[split].read_bytes() == path.read_bytes()
        assert other[split].read_bytes() != path.read_bytes()


def test_split_sizes_labels_and_ambiguous_share(sample: dict[str, Path]) -> None:
    sizes = {split: len(rows(path)) for split, path in sample.items()}
    assert sizes == {"train": 800, "validation": 120, "test": 120}
    for path in sample.values():
        counts = Counter(row["label"] for row in rows(path))
        assert set(counts) == {"HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK", None}
        share = counts[None] / sum(counts.values())
        assert 0.03 <= share <= 0.07
        labelled = [counts[name] for name in ("HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK")]
        assert max(labelled) - min(labelled) <= 1  # balanced classes


def test_no_text_in_two_splits(sample: dict[str, Path]) -> None:
    texts = {split: [str(row["text"]) for row in rows(path)] for split, path in sample.items()}
    all_texts = [text for split_texts in texts.values() for text in split_texts]
    assert len(all_texts) == len(set(all_texts))


def test_texts_and_rationales_are_short_and_label_specific(sample: dict[str, Path]) -> None:
    rationales: dict[object, set[object]] = {}
    for path in sample.values():
        for row in rows(path):
            assert MIN_CHARS <= len(str(row["text"])) <= MAX_CHARS
            assert len(str(row["rationale"])) <= 80
            assert row["metadata"] in ({"channel": "chat"}, {"channel": "email"}, {"channel": "forum"})
            rationales.setdefault(row["label"], set()).add(row["rationale"])
    owners = Counter(r for label_rationales in rationales.values() for r in label_rationales)
    shared = [r for r, n in owners.items() if n > 1]
    assert not shared, f"rationales used by more than one label: {shared}"


def test_held_out_texts_are_new_combinations_of_training_words(sample: dict[str, Path]) -> None:
    # Validation/test texts are unseen as a whole, yet every word in them occurs in training texts
    # of the same label: the splits test generalisation to new combinations, not new vocabulary.
    train_rows = rows(sample["train"])
    train_texts = {str(row["text"]) for row in train_rows}
    vocabulary: dict[object, set[str]] = {}
    for row in train_rows:
        vocabulary.setdefault(row["label"], set()).update(words(str(row["text"])))
    for split in ("validation", "test"):
        for row in rows(sample[split]):
            text = str(row["text"])
            assert text not in train_texts
            if row["label"] is None:
                continue  # only ~40 ambiguous training rows: too few to cover every word
            unseen = words(text) - vocabulary[row["label"]]
            assert not unseen, f"{split}: {text!r} has words never seen for {row['label']}: {unseen}"


def test_short_lines_as_people_type_them_and_the_examples_held_back(sample: dict[str, Path]) -> None:
    texts = [str(row["text"]) for path in sample.values() for row in rows(path)]
    short = [text for text in texts if len(text) < 40]
    assert 0.1 <= len(short) / len(texts) <= 0.3, len(short)
    assert not HELD_BACK & set(texts)  # what the docs show is answered from the templates, never recalled


def test_every_row_reads_back_with_the_real_labels(sample: dict[str, Path]) -> None:
    labels = load_labels(LABELS_YAML)
    for split, path in sample.items():
        examples, skipped = read_examples(path, labels)
        assert skipped == 0
        assert len(examples) == len(rows(path)), split


def test_sample_data_exists(tmp_path: Path) -> None:
    assert not sample_data_exists(tmp_path)
    write_sample_data(tmp_path, n_train=20, n_validation=4, n_test=4)
    assert sample_data_exists(tmp_path)
    (tmp_path / "test.jsonl").write_text("")
    assert not sample_data_exists(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_row_counts_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_test"):
        write_sample_data(tmp_path, n_test=0)
