"""Config loading: YAML, env, --set; one-line errors that name the field and file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.config import RunConfig
from runtime.bus.connect import Credentials, redact_url, resolve_target
from runtime.errors import ConfigError
from runtime.settings import Settings, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_then_env_then_set_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  max_steps: 10\n  learning_rate: 0.01\n")
    env = {"TRAINBUS_TRAINING__MAX_STEPS": "20", "TRAINBUS_TRAINING__SEED": "7"}
    cfg = load_config(RunConfig, path, ["training.max_steps=40", "bus.url=nats://h:1"], environ=env)
    assert cfg.training.max_steps == 40  # --set wins over env and file
    assert cfg.training.seed == 7  # env wins over default
    assert cfg.training.learning_rate == 0.01
    assert cfg.bus.url == "nats://h:1"


@pytest.mark.parametrize(
    ("text", "override", "message"),
    [
        ("trainin:\n  max_steps: 3\n", None, r"cfg.yaml:1: trainin: unknown key \(did you mean training\?\)"),
        ("training:\n  max_stepz: 3\n", None, r"cfg.yaml:2: training.max_stepz: unknown key: not a TrainingArg"),
        ("training:\n  max_steps: many\n", None, r"training.max_steps: Input should be a valid integer"),
        ("training:\n  max_steps: 3\n   bad: [\n", None, r"cfg.yaml:3: invalid YAML"),
        ("- a\n- b\n", None, r"expected a mapping"),
        ("", "training.learning_rate=-1", r"training.learning_rate: Input should be greater than 0"),
        ("", "noequals", r"expected KEY=VALUE"),
        ("", "run_name=a.b", r"run_name: String should match pattern"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, override: str | None, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(RunConfig, path, [override] if override else [], environ={})
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Settings, tmp_path / "nope.yaml", environ={})


def test_nats_url_and_bus_url_precedence(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    target = resolve_target(settings, {"NATS_URL": "nats://a:1, nats://b:2"})
    assert target.servers == ["nats://a:1", "nats://b:2"] and target.origin == "NATS_URL"
    explicit = Settings.model_validate({"state_dir": str(tmp_path), "bus": {"url": "nats://c:3"}})
    assert resolve_target(explicit, {"NATS_URL": "nats://a:1"}).servers == ["nats://c:3"]


def test_credentials_come_from_nats_variables_and_are_never_shown(tmp_path: Path) -> None:
    creds = Credentials.from_env({"NATS_USER": "alice", "NATS_PASSWORD": "s3cret"})
    assert creds.connect_options() == {"user": "alice", "password": "s3cret"}
    assert "s3cret" not in repr(creds)
    assert redact_url("nats://alice:s3cret@host:4222") == "nats://***@host:4222"
    with pytest.raises(ConfigError, match="NATS_CREDS"):
        Credentials.from_env({"NATS_CREDS": str(tmp_path / "missing.creds")})
    token = Credentials.from_env({"NATS_TOKEN": "tok"})
    assert token.connect_options() == {"token": "tok"}
