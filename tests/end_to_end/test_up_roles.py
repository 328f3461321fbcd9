"""The roles page's first block (docs/roles.md), run as written: `up` with the roles config provisions as admin and
starts each consumer under its own role; an operator in a second shell lists the runs. Then the launch queue
under roles: an operator submits a job, up's agent (as `agent`) takes it and starts its trainer (as `trainer`),
which refuses its data at once (no training runs), and a viewer sees the job failed with the trainer's line."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from schemas import JobState
from tests.conftest import wait_until
from tests.end_to_end.conftest import of_type, wait_events

REPO = Path(__file__).resolve().parents[2]
EXPORTER_PORT = 9464


def docs_block(page: str) -> list[str]:
    """The first ```sh block of ``docs/<page>``, as shell commands (continuations joined)."""
    text = (REPO / "docs" / page).read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_the_roles_page_block_works_as_written(tmp_path: Path) -> None:
    with socket.socket() as probe:  # the block runs the exporter on its default port
        if probe.connect_ex(("127.0.0.1", EXPORTER_PORT)) == 0:
            pytest.fail(f"port {EXPORTER_PORT} is taken by another exporter; stop it to run this test")
    exports, up_line, runs_line = docs_block("roles.md")
    assert up_line.startswith("trainbus up --set server.config_file=configs/nats/roles.conf")
    passwords = iter("pw-" + secrets.token_hex(8) for _ in range(exports.count("…")))
    exports = re.sub("…", lambda _: next(passwords), exports)
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # a project folder of the user's, with the shipped configs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINBUS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `trainbus` as installed

    up = subprocess.Popen(
        ["bash", "-c", f"{exports}\nexec {up_line}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(up.stdout or []), daemon=True),
        threading.Thread(target=lambda: err.extend(up.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        wait_until(
            lambda: (
                up.poll() is not None
                or (any("watching" in line for line in out) and any("exporter connected" in line for line in err))
            ),
            timeout=60,
            what="up and its consumers",
        )
        assert up.poll() is None, f"up exited with {up.returncode}: {''.join(err[-5:])}"
        started = {
            m[1]: (m[2], int(m[3]))
            for line in out
            if (m := re.match(r"trainbus: started (\w+) as (\w+) \(pid (\d+)\)", line))
        }
        assert {name: role for name, (role, _) in started.items()} == {
            "audit": "auditor",
            "exporter": "viewer",
            "dashboard": "operator",  # it sends commands
            "agent": "agent",
        }
        for name, (role, pid) in started.items():
            assert environ_of(pid)["NATS_USER"] == role, name  # its own role, not admin
        runs = subprocess.run(
            ["bash", "-c", f"{exports}\n{runs_line}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert runs.returncode == 0, runs.stderr
        assert runs.stdout.startswith("no runs yet")
        assert "embedded" not in runs.stderr  # it used up's bus
        agent_pid = started["agent"][1]
        refused_job(tmp_path, exports, env, bus_url(out), agent_pid)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)
        for reader in readers:
            reader.join(10)
    assert up.returncode == 0
    assert not any("authorization" in line.lower() or "permission" in line.lower() for line in out + err), err


def bus_url(out: list[str]) -> str:
    """Where `up` said its bus listens."""
    found = [m[1] for line in out if (m := re.search(r"listening at (nats://\S+)", line))]
    assert found, out
    return found[0]


def refused_job(tmp_path: Path, exports: str, env: dict[str, str], url: str, agent_pid: int) -> None:
    """An operator submits a run whose data the trainer refuses; up's agent runs it under the roles."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Is this fine?", "label": "NO_SUCH_LABEL"}\n')
    submit = subprocess.run(
        ["bash", "-c", f"{exports}\nNATS_USER=operator NATS_PASSWORD=$TRAINBUS_OPERATOR_PASSWORD trainbus submit "
                       f"configs/tiny.yaml --run-id roles-job --set data.train_file={bad}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.split()[2]  # "queued job j-… for run …"
    viewer = {"user": "viewer", "password": re.findall(r"TRAINBUS_VIEWER_PASSWORD=(\S+)", exports)[0]}
    events = wait_events(url, "roles-job", lambda ev: any(e.state == "failed" for e in of_type(ev, "job.state")),
                         timeout=180, **viewer)  # fmt: skip
    states = [e for e in of_type(events, "job.state") if isinstance(e, JobState) and e.job_id == job_id]
    assert [e.state for e in states] == ["queued", "starting", "failed"]
    assert states[-1].agent == f"{socket.gethostname()}-{agent_pid}"
    assert f"{bad}:1" in states[-1].reason and "NO_SUCH_LABEL" in states[-1].reason  # the trainer's own line
    log = next((tmp_path / ".trainbus" / "agents").glob(f"*/{job_id}/train.log")).read_text()
    assert "permission" not in log.lower() and "authorization" not in log.lower(), log[-2000:]
    queue = subprocess.run(
        ["bash", "-c", f"{exports}\nNATS_USER=viewer NATS_PASSWORD=$TRAINBUS_VIEWER_PASSWORD trainbus queue --all"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert queue.returncode == 0, queue.stderr
    assert re.search(rf"{job_id}\s+failed\s+roles-job", queue.stdout), queue.stdout
