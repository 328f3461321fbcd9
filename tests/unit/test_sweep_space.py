"""The sweep's space file: what users write is sampled as they meant it, mistakes are one line with
file:line; the study refuses a driver that joins it with another search, and a driver adopts only
the trials whose driver is gone."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest

from consumers.sweep.space import load_space, space_json
from consumers.sweep.study import LEASE_SECONDS, abandoned, default_storage, describe_best, driver_identity, open_study
from runtime.cli.main import main
from runtime.errors import ConfigError
from runtime.settings import parse_override

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_shipped_space_searches_the_tiny_config_for_final_accuracy() -> None:
    space = load_space(REPO / "configs/sweeps/tiny.yaml")
    assert (space.metric, space.direction) == ("accuracy", "maximize")
    assert list(space.parameters) == ["training.learning_rate", "adapter.r", "training.warmup_steps"]
    study = optuna.create_study(direction=space.direction)
    study.sampler = space.make_sampler()
    trial = study.ask(dict(space.parameters))
    assert 3e-4 <= trial.params["training.learning_rate"] <= 1e-2
    assert trial.params["adapter.r"] in (8, 16, 32)
    assert trial.params["training.warmup_steps"] in (0, 20, 40, 60)
    assert isinstance(space.make_pruner(), optuna.pruners.MedianPruner)


def test_minimising_the_critical_error_cost_is_one_line(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "objective: critical_error_cost\nparameters:\n  adapter.r: [8, 16]\n"))
    assert (space.metric, space.direction) == ("critical_error_cost", "minimize")
    explicit = load_space(
        write(tmp_path, "objective: {metric: loss, direction: maximize}\nparameters: {adapter.r: [8]}")
    )
    assert (explicit.metric, explicit.direction) == ("loss", "maximize")


def test_sampled_values_reach_the_trainer_with_their_types(tmp_path: Path) -> None:
    space = load_space(
        write(
            tmp_path,
            "parameters:\n"
            "  training.learning_rate: {low: 1e-6, high: 1e-2, log: true}\n"  # YAML 1.1 reads 1e-6 as text
            "  adapter.r: {low: 4, high: 64, step: 4}\n"
            "  adapter.method: [lora, dora]\n"
            "  model.gradient_checkpointing: [true, false]\n",
        )
    )
    assert isinstance(space.parameters["adapter.r"], optuna.distributions.IntDistribution)
    params = {
        "training.learning_rate": 1e-5,
        "adapter.r": 8,
        "adapter.method": "dora",
        "model.gradient_checkpointing": False,
    }
    items = space.overrides(params)
    # what `trainbus train --set` makes of each item is the sampled value itself
    assert {".".join(parse_override(i)[0]): parse_override(i)[1] for i in items} == params


def test_a_restarted_driver_asks_with_the_next_seed_not_the_first_again(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "sampler: {type: random, seed: 7}\nparameters: {training.learning_rate: {low: 0.0, high: 1.0}}"))  # fmt: skip
    first = optuna.create_study()
    first.sampler = space.make_sampler(offset=0)
    again = optuna.create_study()
    again.sampler = space.make_sampler(offset=0)
    later = optuna.create_study()
    later.sampler = space.make_sampler(offset=1)
    values = [s.ask(dict(space.parameters)).params["training.learning_rate"] for s in (first, again, later)]
    assert values[0] == values[1] != values[2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("parameters:\n  adapter.r: {low: 1, hi: 3}\n", ":2: parameters.adapter.r: hi: unknown key"),
        ("parameters:\n  adapter.r: {low: 8, high: 4}\n", ":2: parameters.adapter.r: low 8 is above high 4"),
        ("parameters:\n  r: [8, 16]\n", ":2: parameters.r: name a config key with its section, e.g. adapter.r"),
        ("parameters:\n  adapter.r: 8\n", ":2: parameters.adapter.r: expected a list of choices or a range"),
        ("objective: acuracy\nparameters: {adapter.r: [8]}\n", ":1: objective.metric: Input should be 'accuracy'"),
        ("pruner: {type: median, n_startup: 2}\nparameters: {adapter.r: [8]}\n", ":1: pruner: TypeError: MedianPruner"),
        ("sampler: {type: cmaes}\nparameters: {adapter.r: [8]}\n", ":1: sampler.type: 'cmaes' is not one of"),
        (
            "sampler: {type: grid}\nparameters:\n  adapter.r: [8]\n  training.learning_rate: {low: 0.1, high: 1.0}\n",
            ":4: parameters.training.learning_rate: the grid sampler needs a list of values",
        ),
        ("parameters:\n  training.learning_rate: {low: 0, high: 1, log: true}\n", "log: true needs low > 0"),
        ("parameters: {}\n", ":1: parameters: Dictionary should have at least 1 item"),
    ],
)
def test_space_mistakes_are_one_line_naming_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_sweep_cli_mistakes_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "parameters:\n  adapter.r: [8, 16]\n  oops: [1]\n")
    state = f"state_dir={tmp_path / 'state'}"
    cases = [
        (["sweep", "configs/tiny.yaml", "--trials", "2"], "trainbus sweep: --space is required"),
        (["sweep", "configs/tiny.yaml", "--space", str(bad), "--trials", "2"], f"{bad}:3: parameters.oops:"),
        (
            ["sweep", "nope.yaml", "--space", str(bad), "--trials", "2"],
            "trainbus sweep: nope.yaml: no such config file",
        ),
        (["sweep", "show", "missing", "--set", state], "trainbus sweep: no sweep 'missing' in sqlite:///"),
        (["sweep", "configs/tiny.yaml", "--space", str(bad), "--trials", "2", "--name", "a b"], "--name 'a b'"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(expected) or expected in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "configs/tiny.yaml", "--space", str(bad), "--trials", "0"])
    assert exit_info.value.code == 2
    assert "argument --trials: '0' is not a positive whole number" in capsys.readouterr().err


def test_a_driver_joining_with_another_search_is_refused(tmp_path: Path) -> None:
    storage = default_storage(str(tmp_path / "state"))
    first = load_space(write(tmp_path, "parameters: {adapter.r: [8, 16]}"))
    open_study("s", storage, first, "configs/tiny.yaml", ["training.max_steps=30"])
    open_study("s", storage, first, "configs/tiny.yaml", ["training.max_steps=30"])  # the same search joins
    with pytest.raises(ConfigError, match=r"--name s: .* other --set overrides"):
        open_study("s", storage, first, "configs/tiny.yaml", ["training.max_steps=40"])
    other = load_space(write(tmp_path, "parameters: {adapter.r: [8, 32]}"))
    with pytest.raises(ConfigError, match=r"--name s: .* other objective or parameters"):
        open_study("s", storage, other, "configs/tiny.yaml", ["training.max_steps=30"])
    study = optuna.load_study(study_name="s", storage=storage)  # plain Optuna reads it
    assert describe_best(study) == ["sweep s: no trial has completed yet"]


def test_a_driver_started_beside_the_creator_waits_for_the_whole_description(tmp_path: Path) -> None:
    """Two drivers started at once both create the study: the second found the first's description
    half written and was refused for a search it shares."""
    storage = default_storage(str(tmp_path / "state"))
    space = load_space(write(tmp_path, "parameters: {adapter.r: [8, 16]}"))
    creator = optuna.create_study(study_name="s", storage=storage, direction=space.direction)
    creator.set_user_attr("config", "configs/tiny.yaml")  # the creator is writing the rest
    creator.set_user_attr("overrides", [])

    def finish() -> None:
        time.sleep(1.0)
        creator.set_user_attr("search", space_json(space))
        creator.set_user_attr("space_file", space.path)
        creator.set_user_attr("metric", space.metric)

    writing = threading.Thread(target=finish)
    writing.start()
    try:
        joined = open_study("s", storage, space, "configs/tiny.yaml", [])
    finally:
        writing.join()
    assert joined.user_attrs["search"] == space_json(space)
    with pytest.raises(ConfigError, match=r"other --set overrides"):  # a real difference is still refused
        open_study("s", storage, space, "configs/tiny.yaml", ["training.max_steps=40"])


def test_an_unusable_storage_url_is_one_line(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "parameters: {adapter.r: [8, 16]}"))
    with pytest.raises(ConfigError) as info:
        open_study("s", "nosuchdb://user:secret@host/x", space, "configs/tiny.yaml", [])
    message = str(info.value)
    assert message.startswith("--storage nosuchdb://***@host/x: ") and "secret" not in message


def test_a_running_trial_is_adopted_only_when_its_driver_is_gone(tmp_path: Path) -> None:
    study = optuna.create_study()
    me = driver_identity()
    alive = {**me, "pid": os.getppid()}  # a live process of this host: pytest's parent
    alive["started"] = round(psutil.Process(os.getppid()).create_time(), 2)
    dead = {**me, "pid": alive["pid"], "started": alive["started"] - 100}  # its pid, reused by another process

    def running(owner: dict[str, object] | None, lease: float) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        if owner is not None:
            trial.set_user_attr("driver", owner)
        trial.set_user_attr("lease", lease)
        return study.get_trials(deepcopy=False)[trial.number]

    now = 1_000_000.0
    assert not abandoned(running(me, now), me, now)
    assert not abandoned(running(alive, now - 3600), me, now)  # on this host only the process counts
    assert abandoned(running(dead, now), me, now)
    assert abandoned(running(None, now), me, now)  # asked by a driver that recorded no identity
    elsewhere = {**me, "host": "another-host"}
    assert not abandoned(running(elsewhere, now - LEASE_SECONDS + 5), me, now)
    assert abandoned(running(elsewhere, now - LEASE_SECONDS - 5), me, now)  # it stopped renewing its lease
