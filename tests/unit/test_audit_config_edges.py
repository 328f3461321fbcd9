"""Audit gate settings at their edges: a rule may pause or stop but not both, a rules file kept in
another project finds that project's labels, a gate without the stall rule never calls a run
stalled, and the gate judges only what trainers publish (never its own flags or command results)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers.audit.engine import Output, Tick, handle, new_state
from consumers.audit.rules import AuditConfig, load_rules
from runtime.errors import ConfigError
from runtime.publish.sinks import MemorySink, Stamper
from schemas import AuditFlag, CommandResult, Heartbeat

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_rule_that_both_pauses_and_stops_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.yaml"
    path.write_text("rules:\n  non_finite: {severity: critical, actions: [flag, pause_run, stop_run]}\n")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}: rules.non_finite: actions: choose one of pause_run and stop_run"


def test_rules_in_another_project_read_its_labels_wherever_the_gate_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "labels.yaml").write_text("max_abstain_rate: 0.3\n")
    rules = project / "configs" / "audit.yaml"
    rules.write_text("labels_file: configs/labels.yaml\nrules:\n  abstain_rate: {severity: warning}\n")
    monkeypatch.chdir(tmp_path)  # not the project: configs/labels.yaml is not here
    config = load_rules(rules)
    assert config.rules.abstain_rate is not None and config.rules.abstain_rate.max_rate == 0.3


def test_without_the_stall_rule_a_silent_run_is_never_flagged() -> None:
    state = new_state(AuditConfig.model_validate({"rules": {"non_finite": {"severity": "critical"}}}))
    beat = Stamper(MemorySink(), "quiet", 1).emit(Heartbeat, step=3, phase="training", time=T0)
    state, first = handle(beat, state)
    state, later = handle(Tick(T0 + timedelta(hours=1)), state)
    assert first == [] and later == []


def test_the_gate_ignores_its_own_flags_and_command_results() -> None:
    state = new_state(AuditConfig.model_validate({"rules": {"run_stalled": {"severity": "warning", "seconds": 30}}}))
    audit = Stamper(MemorySink(), "r1", 1, source="audit")
    flag = audit.emit(
        AuditFlag, rule="non_finite", severity="critical", message="loss is NaN", judged_event_id="r1.1.5", time=T0
    )
    result = Stamper(MemorySink(), "r1", 1).emit(
        CommandResult, command_id="c1", command="pause", status="applied", time=T0
    )
    outputs: list[Output] = []
    for event in (flag, result, Tick(T0 + timedelta(hours=1))):
        state, out = handle(event, state)
        outputs += out
    assert outputs == []
    assert "r1" not in state.runs  # nothing a trainer sent: no run to watch for stalls
