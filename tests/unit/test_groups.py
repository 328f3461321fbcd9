"""Groups of runs: values, per-step statistics aligned without interpolation, and group tables."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from runtime.groups import Stats, group_curve, group_table, group_value, t95


def arr(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def test_a_run_joins_the_group_of_its_config_key_tag_or_sweep() -> None:
    config = {"adapter": {"r": 16, "method": "lora"}, "training": {"learning_rate": 0.003}}
    assert group_value("adapter.r", config, {}, None) == "16"
    assert group_value("training.learning_rate", config, {}, None) == "0.003"
    assert group_value("adapter", config, {}, None) is None  # a section is not a value
    assert group_value("adapter.alpha", config, {}, None) is None
    assert group_value("tag:seeds", config, {"seeds": "tiny-1"}, None) == "tiny-1"
    assert group_value("sweep", config, {}, "lr-search") == "lr-search"


def test_members_with_different_logging_steps_meet_only_on_the_steps_they_share() -> None:
    a = (arr(0, 10, 20, 30), arr(4.0, 3.0, 2.0, 1.0))
    b = (arr(0, 5, 10, 15, 20), arr(5.0, 4.5, 4.0, 3.5, 3.0))
    c = (arr(0, 10, 20), arr(6.0, 5.0, 1.0))
    curve = group_curve([a, b, c], "std")
    assert curve.steps.tolist() == [0, 10, 20]
    assert curve.n.tolist() == [3, 3, 3]
    assert curve.mean.tolist() == pytest.approx([5.0, 4.0, 2.0])
    by_hand = statistics.stdev([2.0, 3.0, 1.0])
    assert curve.high[2] - curve.mean[2] == pytest.approx(by_hand)
    every = group_curve([a, b, c], "minmax", shared=False)  # the steps only some members logged too
    assert every.steps.tolist() == [0, 5, 10, 15, 20, 30]
    assert every.n.tolist() == [3, 1, 3, 1, 3, 1]
    assert (every.low[1], every.mean[1], every.high[1]) == (4.5, 4.5, 4.5)  # one member: no band
    assert (every.low[4], every.high[4]) == (1.0, 3.0)


def test_the_95_percent_band_uses_students_t() -> None:
    a, b = (arr(0, 1), arr(1.0, 2.0)), (arr(0, 1), arr(3.0, 6.0))
    curve = group_curve([a, b], "ci95")
    half = t95(2) * statistics.stdev([2.0, 6.0]) / math.sqrt(2)
    assert curve.high[1] - curve.mean[1] == pytest.approx(half)
    assert t95(2) == pytest.approx(12.706) and t95(100) == pytest.approx(1.96) and t95(1) == 0.0


def test_a_spike_of_a_thinned_member_survives_in_the_min_max_band() -> None:
    steps = np.arange(0, 100_000, dtype=np.float64)
    smooth = 2.0 * np.exp(-steps / 50_000)
    spiky = smooth.copy()
    spiky[77_777] = 40.0
    thinned = np.unique(np.concatenate([np.arange(0, 100_000, 10), [77_777]])).astype(np.float64)  # uneven: thinned
    curve = group_curve([(thinned, spiky[thinned.astype(int)]), (steps[::10], smooth[::10])], "minmax")
    assert curve.high.max() == 40.0
    assert len(curve.steps) <= 100_000 // 10 + 1


def test_a_group_table_gives_each_metrics_mean_std_min_and_max() -> None:
    members = {
        "16": {"r1": {"loss": 0.5, "eval_accuracy": 0.9}, "r2": {"loss": 0.7, "eval_accuracy": 0.8}},
        "8": {"r3": {"loss": 1.0, "eval_accuracy": None}},
    }
    rows = group_table(members, ["loss", "eval_accuracy"])
    assert [(r["group"], r["metric"]) for r in rows] == [("8", "loss"), ("16", "loss"), ("16", "eval_accuracy")]
    r16 = rows[1]
    assert (r16["n"], r16["mean"], r16["min"], r16["max"]) == (2, pytest.approx(0.6), 0.5, 0.7)
    assert r16["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert Stats.of([math.nan, 1.0]) == Stats(1, 1.0, 0.0, 1.0, 1.0)
