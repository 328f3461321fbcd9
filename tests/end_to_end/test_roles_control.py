"""With configs/nats/roles.conf: a viewer cannot steer a run (the server denies it), an operator can."""

from __future__ import annotations

from pathlib import Path

from runtime.bus.server import RunningServer
from tests.end_to_end.conftest import ctl, of_type, start_trainer, wait_events


def test_viewer_denied_operator_accepted(
    secured_server: RunningServer, role_passwords: dict[str, str], tmp_path: Path
) -> None:
    url, run = secured_server.url, "roles-run"
    admin = {"user": "admin", "password": role_passwords["admin"]}
    trainer = start_trainer(
        url, "configs/tiny.yaml", run, tmp_path,
        "training.max_steps=100000", "training.logging_steps=2", "training.eval_steps=null", "training.save_steps=null",
        NATS_USER="trainer", NATS_PASSWORD=role_passwords["trainer"],
    )  # fmt: skip
    try:
        wait_events(url, run, lambda ev: of_type(ev, "train.step"), timeout=120, **admin)
        viewer = ctl(
            url, "pause", "--run", run, "--timeout", "2", NATS_USER="viewer", NATS_PASSWORD=role_passwords["viewer"]
        )
        assert viewer.returncode == 3
        assert viewer.stderr.splitlines() == [
            "trainbus ctl: the server denied user 'viewer' publishing to trainbus.control.roles-run "
            "(a viewer may not send commands; use an operator's credentials)"
        ]
        operator = ctl(
            url,
            "stop",
            "--run",
            run,
            "--wait",
            "--as",
            "alice",
            NATS_USER="operator",
            NATS_PASSWORD=role_passwords["operator"],
        )
        assert operator.returncode == 0, operator.stderr
        assert trainer.wait(120) == 0, trainer.output()[-2000:]
    finally:
        if trainer.process.poll() is None:
            trainer.process.kill()
    events = wait_events(url, run, lambda ev: of_type(ev, "run.finished"), **admin)
    results = of_type(events, "command.result")
    assert [(r.command, r.status, r.issued_by) for r in results] == [
        ("stop", "accepted", "alice"),
        ("stop", "applied", "alice"),
    ]
