"""How the sweep judges a trial from its run's events (``consumers.sweep.judge``): the same events
give the same judgement, which is what lets a restarted driver judge a trial from the stream."""

from __future__ import annotations

from typing import Any

from consumers.sweep.judge import Outcome, Report, StopRun, TrialWatch, handle, outcome
from schemas import (
    AuditFlag,
    AuditVerdict,
    Checkpoint,
    CommandResult,
    Evaluation,
    Event,
    Hyperparameters,
    RunFinished,
    RunStarted,
    SweepTag,
    parse_event,
)

RUN = "sw-t0"
ISSUER = "sweep:sw"
_seq = iter(range(1, 10_000))


def ev(cls: type[Any], attempt: int = 1, source: str = "trainer", **fields: Any) -> Any:
    seq = next(_seq)
    return cls(
        event_id=f"{RUN}.{source}.{attempt}.{seq}", run_id=RUN, attempt=attempt, seq=seq, source=source, **fields
    )


def started(attempt: int = 1) -> RunStarted:
    return ev(
        RunStarted,
        attempt,
        config={},
        config_hash="h",
        model="tiny",
        adapter="lora",
        data_fingerprint="d",
        hyperparameters=Hyperparameters(learning_rate=0.003),
        max_steps=30,
        sweep=SweepTag(name="sw", trial=0),
    )


def evaluation(step: int, accuracy: float | None, attempt: int = 1) -> Evaluation:
    return ev(Evaluation, attempt, step=step, loss=1.0, accuracy=accuracy)


def checkpoint(step: int) -> Checkpoint:
    return ev(Checkpoint, step=step, path=f"/runs/{RUN}/checkpoint-{step}", sha256="0" * 64, size_bytes=1)


def verdict(ckpt: Checkpoint, approved: bool) -> AuditVerdict:
    return ev(
        AuditVerdict,
        source="audit",
        checkpoint_event_id=ckpt.event_id,
        checkpoint_step=ckpt.step,
        checkpoint_path=ckpt.path,
        verdict="approved" if approved else "rejected",
        reasons=[] if approved else ["accuracy_floor: accuracy 0 below 0.1"],
    )


def finished(status: str = "completed", step: int = 30, reason: str = "", attempt: int = 1) -> RunFinished:
    return ev(RunFinished, attempt, status=status, step=step, reason=reason)


def feed(events: list[Event], watch: TrialWatch | None = None) -> tuple[TrialWatch, list[Any]]:
    watch = watch or TrialWatch(RUN, "accuracy", ISSUER)
    actions: list[Any] = []
    for event in events:
        actions += handle(event, watch)
    return watch, actions


def completed_run(approved: bool | None) -> list[Event]:
    ckpt = checkpoint(30)
    events: list[Event] = [started(), evaluation(10, 0.1), evaluation(20, 0.25), evaluation(30, 0.28), ckpt, finished()]
    return events + ([verdict(ckpt, approved)] if approved is not None else [])


def test_every_evaluation_is_reported_and_the_last_one_is_the_objective() -> None:
    watch, actions = feed(completed_run(approved=True))
    # the last one is not for the pruner: a run at its last step has nothing left to save
    assert actions == [Report(10, 0.1), Report(20, 0.25), Report(30, 0.28, last=True)]
    assert outcome(watch, verdict_waited=False) == Outcome(
        "complete", 0.28, "", f"/runs/{RUN}/checkpoint-30", "approved"
    )


def test_the_verdict_on_the_last_checkpoint_is_awaited_then_the_trial_judged_without_it() -> None:
    watch, _ = feed(completed_run(approved=None))
    assert outcome(watch, verdict_waited=False) is None  # the audit gate may still be judging it
    result = outcome(watch, verdict_waited=True)
    assert result is not None and (result.state, result.verdict) == ("complete", "pending")


def test_a_rejected_last_checkpoint_fails_the_trial() -> None:
    watch, _ = feed(completed_run(approved=False))
    result = outcome(watch, verdict_waited=False)
    assert result is not None and result.state == "fail" and result.verdict == "rejected"
    assert "last checkpoint (step 30) rejected: accuracy_floor" in result.reason


def test_a_verdict_on_an_earlier_checkpoint_does_not_judge_the_last() -> None:
    early = checkpoint(10)
    watch, _ = feed([started(), evaluation(10, 0.2), early, verdict(early, False), *completed_run(None)[1:]])
    assert outcome(watch, verdict_waited=False) is None


def test_a_critical_flag_stops_the_run_and_fails_the_trial() -> None:
    flag = ev(
        AuditFlag,
        source="audit",
        rule="non_finite",
        severity="critical",
        step=12,
        message="loss is NaN at step 12",
        judged_event_id="x",
    )
    watch, actions = feed([started(), evaluation(10, 0.2), flag])
    assert actions == [Report(10, 0.2), StopRun("critical audit flag non_finite: loss is NaN at step 12")]
    assert outcome(watch, verdict_waited=False) is None  # judged once the run has stopped
    feed([finished("stopped", 12, "stop by sweep:sw")], watch)
    result = outcome(watch, verdict_waited=False)
    assert (
        result is not None and result.state == "fail" and "critical audit flag non_finite at step 12" in result.reason
    )


def test_a_warning_flag_alone_changes_nothing() -> None:
    flag = ev(
        AuditFlag, source="audit", rule="calibration", severity="warning", message="ece high", judged_event_id="x"
    )
    _, actions = feed([*completed_run(True)[:-1], flag, completed_run(True)[-1]])
    assert not any(isinstance(a, StopRun) for a in actions)


def test_a_stop_this_sweep_sent_is_a_prune_and_anyone_elses_a_failure() -> None:
    def stop_by(issuer: str) -> CommandResult:
        return ev(CommandResult, command_id="c", command="stop", status="applied", issued_by=issuer, step=20)

    ours, _ = feed([started(), evaluation(10, 0.0), evaluation(20, 0.0), stop_by(ISSUER), finished("stopped", 20)])
    result = outcome(ours, verdict_waited=False)
    assert result is not None and result.state == "pruned" and result.value == 0.0
    theirs, _ = feed([started(), evaluation(10, 0.0), stop_by("alice"), finished("stopped", 10, "stop by alice")])
    result = outcome(theirs, verdict_waited=False)
    assert result == Outcome("fail", 0.0, "run stopped before the end: stop by alice")


def test_a_failed_run_or_a_silent_trainer_fails_the_trial() -> None:
    crashed, _ = feed([started(), ev(RunFinished, status="failed", step=3, error="RuntimeError: boom")])
    assert outcome(crashed, verdict_waited=False) == Outcome("fail", None, "run failed: RuntimeError: boom")
    silent, _ = feed([started(), evaluation(10, 0.2)])
    assert outcome(silent, verdict_waited=False) is None
    assert outcome(silent, verdict_waited=False, gone="no event for 30 s") == Outcome("fail", 0.2, "no event for 30 s")


def test_a_run_without_the_metric_fails_instead_of_scoring_zero() -> None:
    watch, actions = feed([started(), evaluation(30, None), finished()])
    assert actions == []
    result = outcome(watch, verdict_waited=False)
    assert result is not None and result.state == "fail" and "no finite accuracy" in result.reason


def test_a_resumed_attempt_is_judged_on_its_own_end() -> None:
    watch, _ = feed([started(1), evaluation(10, 0.1), finished("stopped", 10, "received SIGTERM"), started(2)])
    assert outcome(watch, verdict_waited=False) is None  # attempt 2 is running
    feed([evaluation(30, 0.3, attempt=2), finished("completed", 30, attempt=2)], watch)
    assert outcome(watch, verdict_waited=True) == Outcome("complete", 0.3, "", None, None)


def test_run_started_of_an_older_trainer_has_no_sweep_tag() -> None:
    data = started().model_dump(mode="json")
    del data["sweep"]
    old = parse_event(RunStarted.model_validate(data).model_dump_json(exclude={"sweep"}))
    assert isinstance(old, RunStarted) and old.sweep is None
    tagged = parse_event(started().model_dump_json())
    assert isinstance(tagged, RunStarted) and tagged.sweep == SweepTag(name="sw", trial=0)
