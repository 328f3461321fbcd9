"""Tables people read: on a terminal the last column (a checkpoint's reasons) wraps under itself
instead of being cut; in a pipe it stays whole on one line, for grep."""

from __future__ import annotations

from runtime.cli.render import flat, table

WHY = (
    "accuracy_floor (warning): accuracy was 0.12 at step 100, below the minimum of 0.8; "
    "eval_regression (warning): accuracy fell to 0.1 at step 100, 0.05 below the run's best of 0.15"
)


def test_the_last_column_wraps_to_the_width_and_nothing_is_cut() -> None:
    rows = [{"step": 100, "verdict": "rejected", "why": WHY}, {"step": 200, "verdict": "approved", "why": ""}]
    lines = table(rows, ["step", "verdict", "why"], width=60).splitlines()
    assert lines[0] == "STEP  VERDICT   WHY"
    assert all(len(line) <= 60 for line in lines)
    assert lines[1].startswith("100   rejected  accuracy_floor")
    continued = [line for line in lines[2:] if line.startswith(" " * 16)]
    assert " ".join(line.strip() for line in [lines[1][16:], *continued]) == WHY
    assert lines[-1] == "200   approved"
    assert table(rows, ["step", "verdict", "why"]).splitlines()[1].endswith(WHY)  # no width: one line


def test_csv_rows_flatten_nested_fields() -> None:
    row = flat({"step": 3, "hyperparameters": {"learning_rate": 0.1}, "labels": ["A", "B"], "applied": {}})
    assert row == {"step": 3, "hyperparameters.learning_rate": 0.1, "labels": '["A", "B"]', "applied": "{}"}
