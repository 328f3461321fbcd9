"""Run families without a bus: --fork's argument, what a fork changed, seed groups, the fork form's
command, the lineage lines of the Run page, and group curves thinned for display."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from dashboards.app.fork_form import fork_argv
from dashboards.app.group_charts import curve_frame
from dashboards.app.lineage import children_line, children_of, parent_line
from dashboards.app.series import DISPLAY_POINTS
from dashboards.app.snapshot import RunSummary
from producers.run.fork import ForkFrom, changed, choose, fork_arg
from producers.run.resume import Saved
from producers.run.seeds import argv_of, seed_runs
from runtime.errors import NotFound
from runtime.groups import group_curve
from schemas import Checkpoint, ForkTag


def test_fork_takes_a_run_a_step_or_the_best_and_names_a_mistake() -> None:
    assert fork_arg("tiny-1") == ForkFrom("tiny-1")
    assert fork_arg("tiny-1@200") == ForkFrom("tiny-1", step=200)
    assert fork_arg("tiny-1@best") == ForkFrom("tiny-1", best=True)
    assert str(ForkFrom("r", step=5)) == "r@5" and str(ForkFrom("r", best=True)) == "r@best"
    for bad in ("tiny-1@latest", "bad run@3", "r@-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            fork_arg(bad)


def checkpoint(step: int) -> Checkpoint:
    return Checkpoint(event_id=f"p.1.{step}", run_id="p", seq=step, step=step, path=f"runs/p/checkpoint-{step}", sha256="a" * 64, size_bytes=1)  # fmt: skip


def test_a_fork_starts_from_the_newest_the_named_or_the_best_checkpoint() -> None:
    saved = Saved(checkpoints={100: checkpoint(100), 200: checkpoint(200)})
    assert choose(saved, ForkFrom("p"), None).step == 200
    assert choose(saved, ForkFrom("p", step=100), None).step == 100
    assert choose(saved, ForkFrom("p", best=True), "p.1.100").step == 100
    with pytest.raises(NotFound, match="no checkpoint at step 150 \\(steps: 100, 200\\)"):
        choose(saved, ForkFrom("p", step=150), None)
    with pytest.raises(NotFound, match="approved no checkpoint"):
        choose(saved, ForkFrom("p", best=True), None)


def test_what_a_fork_changed_is_every_differing_key_but_the_shared_settings() -> None:
    parent = {"training": {"learning_rate": 0.003, "max_steps": 600}, "bus": {"url": "nats://a"}, "adapter": {"r": 32}}
    fork = {
        "training": {"learning_rate": 0.001, "max_steps": 600},
        "bus": {"url": "nats://b"},
        "adapter": {"r": 32, "alpha": 8},
    }
    assert changed(parent, fork) == {
        "adapter.alpha": {"from": None, "to": 8},
        "training.learning_rate": {"from": 0.003, "to": 0.001},
    }


def test_seeds_make_one_group_of_runs_that_differ_only_in_their_seed() -> None:
    assert seed_runs("r16", 42, 3) == [("r16-s42", 42), ("r16-s43", 43), ("r16-s44", 44)]
    args = argparse.Namespace(
        config="configs/tiny.yaml", fork=None, force=False, offline_ok=False, overrides=["adapter.r=16"]
    )
    argv = argv_of(args, "r16-s43", 43, "r16")
    assert argv[3:] == ["train", "configs/tiny.yaml", "--run-id", "r16-s43", "--group", "r16",
                        "--set", "adapter.r=16", "--set", "training.seed=43"]  # fmt: skip


def test_the_fork_form_queues_the_fork_with_the_values_changed() -> None:
    argv = fork_argv("tiny-1", 200, {"training.learning_rate": "1e-3", "training.max_steps": ""}, "adapter.dropout=0.1\n", run="", force=True)  # fmt: skip
    assert argv[3:] == ["submit", "--slots", "1", "--priority", "normal", "--set", "training.learning_rate=1e-3",
                        "--set", "adapter.dropout=0.1", "--fork", "tiny-1@200", "--force"]  # fmt: skip


def summary(run_id: str, fork: ForkTag | None = None, started: float = 0.0) -> RunSummary:
    return RunSummary(
        run_id=run_id, state="completed", finished=True, attempt=1, step=0, max_steps=None, loss=None, learning_rate=None,
        best_accuracy=None, eval_accuracy=None, best_perplexity=None, approved=0, rejected=0, pending=0, model="tiny",
        adapter="lora", first_event_time=started, last_event_time=started, config={}, fork=fork,
    )  # fmt: skip


def test_the_run_page_names_a_forks_parent_what_changed_and_a_runs_forks() -> None:
    tag = ForkTag(parent="p", step=200, sha256="b" * 64, checkpoint_event_id="p.1.9",
                  changed={"training.learning_rate": {"from": 0.003, "to": 0.001}})  # fmt: skip
    child, other = summary("c", tag, started=2.0), summary("d", tag.model_copy(update={"step": 100}), started=1.0)
    line = parent_line(child)
    assert (
        line
        == f"Forked from [p](run?run=p) at step 200 · changed training.learning_rate 0.003 → 0.001 · checkpoint sha256 {'b' * 12}…"
    )
    assert parent_line(summary("p")) is None
    kids = children_of("p", [child, summary("p"), other])
    assert [k.run_id for k in kids] == ["d", "c"]
    assert children_line(kids) == "Forks: [d](run?run=d) at step 100, [c](run?run=c) at step 200"
    assert children_line([]) is None


def test_ten_long_runs_draw_as_a_thinned_group_curve_that_keeps_a_spike() -> None:
    steps = np.arange(0.0, 20_000.0)  # what the dashboard keeps of each 100k-step run (RAW_CAP points)
    members = [(steps, 2.0 * np.exp(-steps / 10_000) + 0.01 * k) for k in range(10)]
    spiky = members[3][1].copy()
    spiky[12_345] = 30.0
    members[3] = (steps, spiky)
    frame = curve_frame("g", group_curve(members, "minmax"))
    assert len(frame) <= 3 * DISPLAY_POINTS
    assert frame["high"].max() == 30.0 and frame["n"].min() == 10
