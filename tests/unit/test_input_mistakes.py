"""More mistakes a user makes in configs, label files and data, each answered by one clear line;
and values the loaders accept as the user meant them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producers.config import RunConfig
from producers.task.data import read_examples
from producers.task.labels import load_labels
from runtime.errors import ConfigError
from runtime.settings import Settings, load_config
from tests.unit.test_labels import GOOD as LABELS

REPO = Path(__file__).resolve().parents[2]
CONFUSION = "  - {true: LOW_RISK, predicted: HIGH_RISK, weight: 50}"


def one_line(info: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --- run configs -------------------------------------------------------------------------------


def test_a_folder_given_as_the_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, tmp_path, environ={})
    assert one_line(info) == f"{tmp_path}: cannot read: Is a directory"


def test_setting_inside_a_value_names_the_key_that_is_not_a_section(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_steps: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, path, ["training.max_steps.limit=3"], environ={})
    assert one_line(info) == ("--set training.max_steps.limit=3: training.max_steps.limit: max_steps is not a section")


def test_bf16_and_fp16_together_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, None, ["training.bf16=true", "training.fp16=true"], environ={})
    assert "training.bf16 and training.fp16 are exclusive" in one_line(info)


def test_text_that_is_not_yaml_is_taken_as_written_from_set_and_from_the_environment() -> None:
    prompt = "Answer: [JSON only"  # YAML cannot parse it (an unclosed flow sequence)
    from_set = load_config(RunConfig, None, [f"data.system_prompt={prompt}"], environ={})
    from_env = load_config(RunConfig, None, environ={"TRAINBUS_DATA__SYSTEM_PROMPT": prompt})
    assert from_set.data.system_prompt == from_env.data.system_prompt == prompt


def test_a_dumped_config_keeps_the_bus_host_but_not_its_password() -> None:
    cfg = load_config(Settings, None, environ={"TRAINBUS_BUS__URL": "nats://trainer:s3cret@bus.example:4222"})
    assert cfg.bus.url == "nats://trainer:s3cret@bus.example:4222"  # what the process connects with
    dumped = json.dumps(cfg.model_dump(mode="json"))  # what run.started and trainbus-run.json carry
    assert "s3cret" not in dumped and "nats://***@bus.example:4222" in dumped
    assert cfg.model_dump()["bus"]["url"] == "nats://***@bus.example:4222"
    assert Settings().model_dump()["bus"]["url"] is None


# --- label files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("confusions", "expected"),
    [
        (
            "  - {true: LOW_RISK, predicted: LOW_RISK, weight: 5}",
            ":7: critical_confusions.0: true and predicted are both 'LOW_RISK'; a correct answer costs 0",
        ),
        (
            f"{CONFUSION}\n  - {{true: LOW_RISK, predicted: HIGH_RISK, weight: 9}}",
            ":8: critical_confusions.1: pair LOW_RISK -> HIGH_RISK is listed twice",
        ),
    ],
)
def test_label_file_confusions_that_make_no_sense_name_file_line_and_entry(
    tmp_path: Path, confusions: str, expected: str
) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(LABELS.replace(CONFUSION, confusions))
    with pytest.raises(ConfigError) as info:
        load_labels(path)
    assert one_line(info) == f"{path}{expected}"


def test_label_file_missing_a_setting_names_it(tmp_path: Path) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(LABELS.replace("max_abstain_rate: 0.15\n", ""))
    with pytest.raises(ConfigError) as info:
        load_labels(path)
    assert one_line(info) == f"{path}:1: max_abstain_rate: Field required"


def test_empty_label_file_says_what_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_labels(path)
    assert one_line(info).startswith(f"{path}: labels: Field required")


# --- data files --------------------------------------------------------------------------------


def test_metadata_that_is_not_an_object_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"text": "fine", "label": "NO_RISK"}, {"text": "fine", "label": "NO_RISK", "metadata": ["chat"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError) as info:
        read_examples(path, load_labels(REPO / "configs/labels.yaml"))
    assert one_line(info) == (
        f"{path}:2: field 'metadata': expected an object, got array (set data.skip_invalid=true to skip bad rows instead)"
    )


def test_a_folder_given_as_the_data_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_examples(tmp_path, load_labels(REPO / "configs/labels.yaml"))
    assert one_line(info) == f"{tmp_path}: cannot read: Is a directory"
