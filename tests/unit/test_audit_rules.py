"""The audit rules file: the shipped one loads; mistakes name the rule and the field in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from consumers.audit.rules import load_rules
from runtime.cli.main import main
from runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, labels: str = "max_abstain_rate: 0.2\n") -> Path:
    (tmp_path / "labels.yaml").write_text(labels)
    path = tmp_path / "audit.yaml"
    path.write_text(f"labels_file: {tmp_path / 'labels.yaml'}\n{text}")
    return path


def test_shipped_rules_load_with_every_rule_and_abstain_limit_from_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    text = (REPO / "configs/audit.yaml").read_text()
    assert text.startswith("# trainbus audit --rules configs/audit.yaml")
    config = load_rules("configs/audit.yaml")
    assert len(config.rules.enabled()) == 10
    assert config.rules.abstain_rate is not None and config.rules.abstain_rate.max_rate == 0.15
    assert config.rules.text_only is not None and config.rules.text_only.max_abstain_rate == 0.15
    assert config.rules.non_finite is not None and "pause_run" in config.rules.non_finite.actions


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ("  loss_spikes: {severity: warning}\n", "rules.loss_spikes: unknown rule (rules: non_finite, loss_spike"),
        ("  loss_spike: {severity: warning, factr: 3}\n", "rules.loss_spike.factr: unknown field of rule loss_spike"),
        ("  non_finite: {severity: fatal}\n", "rules.non_finite.severity: Input should be 'info', 'warning' or"),
        ("  non_finite: {severity: critical, actions: [page]}\n", "rules.non_finite.actions.0: Input should be"),
        ("  loss_spike: {severity: warning, factor: 0.5}\n", "rules.loss_spike.factor: Input should be greater than 1"),
        ("  grad_norm_explosion: {severity: warning}\n", "rules.grad_norm_explosion.threshold: Field required"),
        (
            "  non_finite: {severity: warning, actions: [pause_run]}\n",
            "rules.non_finite: actions: pause_run needs severity critical, not warning",
        ),
    ],
)
def test_rules_file_mistakes_name_rule_and_field(tmp_path: Path, rules: str, expected: str) -> None:
    path = write(tmp_path, "rules:\n" + rules)
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_abstain_rule_needs_a_limit_in_the_labels_file(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  abstain_rate: {severity: warning}\n", labels="abstain_threshold: 0.7\n")
    with pytest.raises(ConfigError, match=r"labels.yaml: max_abstain_rate: expected a number between 0 and 1"):
        load_rules(path)


def test_abstain_limit_in_the_rule_overrides_the_labels_file(tmp_path: Path) -> None:
    config = load_rules(write(tmp_path, "rules:\n  abstain_rate: {severity: warning, max_rate: 0.4}\n"))
    assert config.rules.abstain_rate is not None and config.rules.abstain_rate.max_rate == 0.4
    rules = "rules:\n  text_only: {severity: warning, min_accuracy: 0.9, max_abstain_rate: 0.3}\n"
    config = load_rules(write(tmp_path, rules, labels="abstain_threshold: 0.7\n"))  # no limit needed there
    assert config.rules.text_only is not None and config.rules.text_only.max_abstain_rate == 0.3


def test_cli_exits_2_with_one_line_before_touching_the_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "rules:\n  stall: {severity: warning, seconds: 5}\n")
    try:
        assert main(["audit", "--rules", str(path), "--set", "bus.url=nats://127.0.0.1:1"]) == 2
    finally:
        structlog.reset_defaults()  # main() pointed structlog at the captured stderr, closed after the test
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"trainbus audit: {path}: rules.stall: unknown rule")
    assert len(err.splitlines()) == 1
