"""The label set: the shipped labels.yaml loads, mistakes are priced, bad files get one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.task.labels import LabelSet, load_labels
from runtime.errors import ConfigError

LABELS_YAML = Path(__file__).resolve().parents[2] / "configs" / "labels.yaml"

GOOD = """\
labels:
  - name: HIGH_RISK
    harm_weight: 10
  - name: LOW_RISK
    harm_weight: 1
critical_confusions:
  - {true: LOW_RISK, predicted: HIGH_RISK, weight: 50}
abstain_threshold: 0.7
max_abstain_rate: 0.15
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    return path


def test_shipped_label_file_loads_in_order() -> None:
    labels = load_labels(LABELS_YAML)
    assert labels.names == ["HIGH_RISK", "MEDIUM_RISK", "LOW_RISK", "NO_RISK"]
    assert labels.index("LOW_RISK") == 2
    assert labels.harm_weight("NO_RISK") == pytest.approx(0.1)
    assert labels.abstain_threshold == pytest.approx(0.7)
    assert labels.max_abstain_rate == pytest.approx(0.15)


def test_confusion_cost_uses_critical_pairs_then_harm_weight() -> None:
    labels = load_labels(LABELS_YAML)
    assert labels.confusion_cost("NO_RISK", "HIGH_RISK") == 100  # listed critical confusion
    assert labels.confusion_cost("LOW_RISK", "HIGH_RISK") == 50
    assert labels.confusion_cost("HIGH_RISK", "NO_RISK") == 10  # missing a HIGH_RISK: its harm weight
    assert labels.confusion_cost("NO_RISK", "LOW_RISK") == pytest.approx(0.1)
    assert labels.confusion_cost("MEDIUM_RISK", "MEDIUM_RISK") == 0


def test_unknown_label_lookup_is_an_error() -> None:
    labels = load_labels(LABELS_YAML)
    with pytest.raises(KeyError, match="FOO"):
        labels.index("FOO")
    with pytest.raises(KeyError):
        labels.confusion_cost("HIGH_RISK", "FOO")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "predicted: HIGH_RISK, weight: 50",
            "predicted: FOO, weight: 50",
            r"labels.yaml:7: critical_confusions.0.predicted: unknown label 'FOO' \(labels: HIGH_RISK, LOW_RISK\)$",
        ),
        ("{true: LOW_RISK,", "{true: MID,", r"labels.yaml:7: critical_confusions.0.true: unknown label 'MID'"),
        ("name: LOW_RISK", "name: HIGH_RISK", r"labels.yaml:4: labels.1.name: duplicate label 'HIGH_RISK'"),
        ("harm_weight: 1\n", "harm_weight: -1\n", r"labels.yaml:5: labels.1.harm_weight: .*greater than or equal to 0"),
        ("abstain_threshold: 0.7", "abstain_threshold: 0", r"labels.yaml:8: abstain_threshold: .*greater than 0"),
        ("max_abstain_rate: 0.15", "max_abstain_rate: 1.5", r"max_abstain_rate: .*less than or equal to 1"),
        (
            "    harm_weight: 10\n",
            "    harm_weight: 10\n    colour: red\n",
            r"labels.yaml:4: labels.0.colour: unknown key",
        ),
        ("weight: 50}", "weight: 50, note: x}", r"critical_confusions.0.note: unknown key"),
        ("    harm_weight: 1\n", "", r"labels.yaml:4: labels.1.harm_weight: Field required"),
    ],
)
def test_bad_label_file_names_file_line_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_labels(path)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_one_label_is_not_a_classifier(tmp_path: Path) -> None:
    text = "labels:\n  - name: A\n    harm_weight: 1\nabstain_threshold: 0.5\nmax_abstain_rate: 0.1\n"
    with pytest.raises(ConfigError, match=r"labels.yaml:1: labels: List should have at least 2 items"):
        load_labels(write(tmp_path, text))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file"):
        load_labels(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"labels.yaml:\d+: invalid YAML"):
        load_labels(write(tmp_path, "labels:\n  - [\n"))


def test_label_set_checks_references_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="unknown label 'X'"):
        LabelSet.model_validate(
            {
                "labels": [{"name": "A", "harm_weight": 1}, {"name": "B", "harm_weight": 1}],
                "critical_confusions": [{"true": "A", "predicted": "X", "weight": 5}],
                "abstain_threshold": 0.5,
                "max_abstain_rate": 0.1,
            }
        )
