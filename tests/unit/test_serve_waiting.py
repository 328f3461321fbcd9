"""What `trainbus serve --run RUN` says while nothing is approved, and when it stops waiting (#21.3)."""

from __future__ import annotations

import pytest

from consumers.predict.waiting import Every, RunProgress, nothing_to_serve, waiting_line


def test_a_finished_run_with_every_checkpoint_rejected_names_the_verdicts_and_force() -> None:
    progress = RunProgress("r1", started=True, finished="completed", step=40, verdicts={20: "rejected", 40: "rejected"})
    assert nothing_to_serve(progress) == (
        "run r1 completed at step 40 and the audit gate approved none of its checkpoints "
        "(step 20 rejected, step 40 rejected); serve one anyway with --step S --force, "
        "e.g. trainbus serve --run r1 --step 40 --force"
    )


def test_a_finished_run_without_a_checkpoint_has_nothing_to_serve() -> None:
    progress = RunProgress("r1", started=True, finished="stopped", step=7)
    assert nothing_to_serve(progress) == "run r1 stopped at step 7 without a checkpoint: there is nothing to serve"


@pytest.mark.parametrize(
    ("progress", "says"),
    [
        (
            RunProgress("r1", started=True, step=120, verdicts={100: "rejected"}),
            "waiting for the audit gate to approve a checkpoint of run r1 (training, at step 120; step 100 rejected); "
            "serving starts with the first approved one",
        ),
        (
            RunProgress("r1", started=True),
            "waiting for the audit gate to approve a checkpoint of run r1 (training, starting; no checkpoint yet); "
            "serving starts with the first approved one",
        ),
        (
            RunProgress("r1", started=True, finished="completed", step=40, verdicts={20: "rejected", 40: "pending"}),
            "run r1 completed at step 40; waiting for the audit gate's verdict on its checkpoint at step 40 "
            "(is `trainbus audit` running?)",
        ),
        (RunProgress("r1"), "waiting for run r1 to start, then for the audit gate to approve one of its checkpoints"),
    ],
)
def test_while_a_checkpoint_may_still_come_it_says_what_it_waits_for(progress: RunProgress, says: str) -> None:
    assert nothing_to_serve(progress) is None
    assert waiting_line(progress) == says


def test_an_approved_checkpoint_is_waited_for_even_after_the_run_finished() -> None:
    progress = RunProgress("r1", started=True, finished="completed", step=40, verdicts={40: "approved"})
    assert nothing_to_serve(progress) is None  # its best entry is on its way


def test_the_waiting_line_comes_at_once_then_every_minute() -> None:
    every = Every(60.0)
    assert [every.due(t) for t in (100.0, 101.0, 159.9, 160.0, 200.0, 220.0)] == [True, False, False, True, False, True]
