"""The small decisions behind `trainbus up` and the audit partitions, without a server: who each
consumer runs as, extra service arguments, the roles file's variables, `--partition K/N`."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.audit.partitions import parse_partition, transform
from runtime.bus.server import included_config
from runtime.cli.up import admin_credentials, service_env, with_extra_args
from runtime.errors import ConfigError
from runtime.settings import ServerSettings
from tests.conftest import ROLE_NAMES

REPO = Path(__file__).resolve().parents[2]


def test_each_consumer_runs_as_its_role_when_that_roles_password_is_set() -> None:
    env = {
        "TRAINBUS_AUDITOR_PASSWORD": "a",
        "TRAINBUS_VIEWER_PASSWORD": "v",
        "NATS_USER": "admin",
        "NATS_PASSWORD": "x",
    }
    audit, role = service_env("audit", "nats://h:1", env)
    assert role == "auditor" and (audit["NATS_USER"], audit["NATS_PASSWORD"], audit["NATS_URL"]) == (
        "auditor",
        "a",
        "nats://h:1",
    )
    exporter, role = service_env("exporter", "nats://h:1", env)
    assert role == "viewer" and exporter["NATS_USER"] == "viewer"
    predictor, role = service_env("predict", "nats://h:1", env)  # no predictor password: up's own user
    assert role is None and predictor["NATS_USER"] == "admin"
    unknown, role = service_env("something-new", "nats://h:1", env)  # read-only unless told otherwise
    assert role == "viewer" and unknown["NATS_USER"] == "viewer"


def test_up_provisions_as_admin_unless_the_nats_variables_name_someone() -> None:
    assert admin_credentials({"TRAINBUS_ADMIN_PASSWORD": "p"}).connect_options() == {"user": "admin", "password": "p"}
    assert admin_credentials({"TRAINBUS_ADMIN_PASSWORD": "p", "NATS_TOKEN": "t"}).connect_options() == {"token": "t"}
    assert admin_credentials({}).connect_options() == {}


def test_service_args_append_to_the_named_service_and_name_the_services_when_wrong() -> None:
    services = {"audit": ["trainbus", "audit"], "exporter": ["trainbus", "exporter"]}
    out = with_extra_args(services, ["exporter=--port 9465 --host 0.0.0.0"])
    assert out["exporter"] == ["trainbus", "exporter", "--port", "9465", "--host", "0.0.0.0"]
    assert services["exporter"] == ["trainbus", "exporter"]
    with pytest.raises(ConfigError) as info:
        with_extra_args(services, ["--port 1"])
    assert str(info.value) == "--service-args '--port 1': expected NAME=ARGS with NAME one of audit, exporter"


def test_a_roles_file_whose_passwords_are_not_exported_is_named_before_the_server_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for role in ROLE_NAMES:
        monkeypatch.setenv(f"TRAINBUS_{role.upper()}_PASSWORD", "x")
    roles = str(REPO / "configs/nats/roles.conf")
    assert "authorization" in included_config(ServerSettings(config_file=roles))
    monkeypatch.delenv("TRAINBUS_ADMIN_PASSWORD")
    monkeypatch.delenv("TRAINBUS_VIEWER_PASSWORD")
    with pytest.raises(ConfigError) as info:
        included_config(ServerSettings(config_file=roles))
    assert str(info.value) == (
        f"server.config_file: {roles} reads $TRAINBUS_ADMIN_PASSWORD, $TRAINBUS_VIEWER_PASSWORD from the "
        "environment; export them before starting the bus"
    )


@pytest.mark.parametrize("value", ["12345678", "0042", "-5", "3.5", "1.5e3", "64MB", "2k"])
def test_a_password_nats_server_would_read_as_a_number_is_refused_by_name(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role in ROLE_NAMES:
        monkeypatch.setenv(f"TRAINBUS_{role.upper()}_PASSWORD", "a1b2c3d4e5")  # letters and digits: a string
    roles = str(REPO / "configs/nats/roles.conf")
    monkeypatch.setenv("TRAINBUS_PREDICTOR_PASSWORD", value)
    with pytest.raises(ConfigError) as info:
        included_config(ServerSettings(config_file=roles))
    assert str(info.value) == (
        f"server.config_file: {roles} reads $TRAINBUS_PREDICTOR_PASSWORD, whose value nats-server would read "
        "as a number, not a string: use a value with letters in it"
    )
    for fine in ("1e5", "+5", "12ab", "a1b2c3d4e5"):  # nats-server takes these as strings
        monkeypatch.setenv("TRAINBUS_PREDICTOR_PASSWORD", fine)
        assert "authorization" in included_config(ServerSettings(config_file=roles))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("2", "--partition '2': expected K/N, e.g. 0/2 for the first of two gates"),
        ("2/2", "--partition '2/2': K must be 0 to N-1 and N at least 1"),
        ("0/0", "--partition '0/0': K must be 0 to N-1 and N at least 1"),
    ],
)
def test_a_bad_partition_is_one_clear_line(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_partition(text)
    assert str(info.value) == error


def test_the_partition_transform_is_natss_own_partition_of_the_run_token() -> None:
    assert parse_partition(" 1/4 ") == (1, 4)
    tr = transform(4)
    assert (tr.src, tr.dest) == ("trainbus.events.*.>", "trainbus.audit.{{partition(4,1)}}.{{wildcard(1)}}.>")
