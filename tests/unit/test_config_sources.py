"""A run config as a new user writes it: any `TrainingArguments` field, every mistake listed at
once and blamed on where it was written (file:line, the environment variable, the --set item),
and relative paths that mean the same wherever the command runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.config import RunConfig
from producers.run.arguments import check_training, training_arguments
from runtime.cli.main import build_parser
from runtime.errors import ConfigError
from runtime.settings import PROJECT_ROOT, load_config, packaged


def load(path: Path | None = None, *overrides: str, environ: dict[str, str] | None = None) -> RunConfig:
    return load_config(RunConfig, path, list(overrides), environ=environ or {}, check=check_training)


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_training_arguments_fields_beyond_the_declared_ones_reach_the_trainer(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  eval_strategy: no\n  report_to: [tensorboard]\n  lr_scheduler_kwargs: {}\n")
    cfg = load(path, "training.adam_beta2=0.95")
    args = training_arguments(cfg, tmp_path / "run")
    assert args.eval_strategy == "no"  # YAML's unquoted `no` is the word, not false
    assert args.report_to == ["tensorboard"] and args.adam_beta2 == 0.95
    from_set = training_arguments(load(None, "training.eval_strategy=no", "training.report_to=tensorboard"), tmp_path)
    assert from_set.eval_strategy == "no" and from_set.report_to == ["tensorboard"]


def test_an_environment_override_is_blamed_on_the_variable_not_the_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_steps: 10\n")
    message = error_of(path, environ={"TRAINBUS_TRAINING__MAX_STEP": "40"})
    assert message == (
        "environment variable TRAINBUS_TRAINING__MAX_STEP: training.max_step: "
        "unknown key: not a TrainingArguments field (did you mean max_steps?)"
    )


def test_every_mistake_in_a_config_is_listed_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "run_name: ok\n"
        "data:\n"
        "  labels_fil: labels.yaml\n"
        "training:\n"
        "  learning_rate: -1\n"
        "  max_stepz: 3\n"
        "  adam_beta1: high\n"
    )
    message = error_of(path, "adapter.r=0")
    assert f"{path}:3: data.labels_fil: unknown key (did you mean labels_file?)" in message
    assert f"{path}:5: training.learning_rate: Input should be greater than 0" in message
    assert (
        f"{path}:6: training.max_stepz: unknown key: not a TrainingArguments field (did you mean max_steps?)" in message
    )
    assert f"{path}:7: training.adam_beta1: Input should be a valid number" in message
    assert "--set adapter.r=0: adapter.r: Input should be greater than or equal to 1" in message
    assert "more)" not in message


def test_what_training_arguments_itself_refuses_is_said_in_its_own_words() -> None:
    message = error_of(None, "training.load_best_model_at_end=true", "training.eval_steps=null")
    assert message.startswith("training: TrainingArguments refused these settings: --load_best_model_at_end requires")


def test_a_reporting_integration_that_is_not_installed_is_named_before_anything_loads() -> None:
    message = error_of(None, "training.report_to=[wandb]")
    assert message.startswith("--set training.report_to=[wandb]: training.report_to: wandb: ")
    assert "pip install wandb" in message
    assert "'nope' is not a reporting integration" in error_of(None, "training.report_to=nope")


def test_paths_in_a_config_file_are_relative_to_it_and_set_ones_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project" / "configs"
    project.mkdir(parents=True)
    path = project / "run.yaml"
    path.write_text(
        "model:\n  name_or_path: ../models/base\n"
        "data:\n  train_file: ../data/train.jsonl\n  labels_file: labels.yaml\n  validation_file: /abs/v.jsonl\n"
        "training:\n  output_dir: ../runs\n  deepspeed: ../ds.json\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(RunConfig, path, ["data.test_file=mine/test.jsonl"], environ={})  # no deepspeed here to check
    root = tmp_path / "project"
    assert cfg.model.name_or_path == str(root / "models/base")
    assert cfg.data.train_file == str(root / "data/train.jsonl")
    assert cfg.data.labels_file == str(project / "labels.yaml")
    assert cfg.data.validation_file == "/abs/v.jsonl"
    assert cfg.data.test_file == "mine/test.jsonl"  # typed in the shell: relative to where it runs
    assert cfg.training.output_dir == str(root / "runs")
    assert cfg.training.arguments()["deepspeed"] == str(root / "ds.json")
    hub = tmp_path / "hub.yaml"
    hub.write_text("model:\n  name_or_path: Qwen/Qwen2.5-7B-Instruct\n")
    assert load(hub).model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"  # a hub id is not a path


def test_trainbus_own_configs_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert packaged("configs/tiny.yaml") == str(PROJECT_ROOT / "configs/tiny.yaml")
    assert packaged("configs/nope.yaml") == "configs/nope.yaml"  # no such copy: the error names what was typed
    cfg = load(Path(packaged("configs/tiny.yaml")))
    assert cfg.data.labels_file == str(PROJECT_ROOT / "configs/labels.yaml")
    assert cfg.data.train_file == "runs/sample-data/train.jsonl"  # the sample set goes where the run is
    assert RunConfig().data.labels_file == str(PROJECT_ROOT / "configs/labels.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/tiny.yaml").write_text("run_name: mine\n")
    assert packaged("configs/tiny.yaml") == "configs/tiny.yaml"  # a copy here wins


FILE_ARGUMENTS = [
    (["train", "configs/tiny.yaml"], "config", "configs/tiny.yaml"),
    (["sweep", "configs/tiny.yaml", "--space", "configs/sweeps/tiny.yaml"], "config", "configs/tiny.yaml"),
    (["sweep", "configs/tiny.yaml", "--space", "configs/sweeps/tiny.yaml"], "space", "configs/sweeps/tiny.yaml"),
    (
        ["serve", "--config", "configs/predict.yaml", "--labels", "configs/labels.yaml"],
        "config",
        "configs/predict.yaml",
    ),
    (["serve", "--config", "configs/predict.yaml", "--labels", "configs/labels.yaml"], "labels", "configs/labels.yaml"),
    (["export", "--run", "r", "--merge", "out", "--labels", "configs/labels.yaml"], "labels", "configs/labels.yaml"),
    (["audit", "--rules", "configs/audit.yaml"], "rules", "configs/audit.yaml"),
    (["demo"], "config", "configs/tiny.yaml"),
    (["runs", "--config", "configs/tiny.yaml"], "config", "configs/tiny.yaml"),
    (["up", "--config", "configs/tiny.yaml"], "config", "configs/tiny.yaml"),
    (["ctl", "pause", "--run", "r", "--config", "configs/tiny.yaml"], "config", "configs/tiny.yaml"),
]


@pytest.mark.parametrize(("argv", "dest", "shipped"), FILE_ARGUMENTS)
def test_every_command_finds_trainbus_own_config_and_space_files_from_any_folder(
    argv: list[str], dest: str, shipped: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == str(PROJECT_ROOT / shipped)


def test_chat_task_defaults_to_its_own_sample_files() -> None:
    cfg = load(None, "data.task=chat")
    assert cfg.data.train_file == "runs/sample-chat/train.jsonl"
    assert cfg.data.validation_file == "runs/sample-chat/validation.jsonl"
    assert load(None, "data.task=chat", "data.validation_file=null").data.validation_file is None


def test_a_run_config_written_before_kept_its_extra_arguments_under_extra() -> None:
    old = {"training": {"max_steps": 5, "extra": {"eval_strategy": "no"}}}  # as an older run.started carries it
    cfg = RunConfig.model_validate(old)
    assert cfg.training.arguments() == {"eval_strategy": "no"} and cfg.training.max_steps == 5


def test_a_config_that_still_sets_publish_memory_limit_loads_and_the_value_has_no_effect() -> None:
    """Events wait in the run's outbox file, not in memory: old configs and run.started snapshots still load."""
    cfg = RunConfig.model_validate({"publish": {"memory_limit": 40, "heartbeat_seconds": 1.0}})
    assert cfg.publish.heartbeat_seconds == 1.0 and "memory_limit" not in cfg.publish.model_dump()
