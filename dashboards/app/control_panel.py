"""The control panel of the Run page: pause, resume, stop (confirmed), save, evaluate and set.

Commands are built by ``consumers.control_client.build_command`` (the code behind `trainbus ctl`) and
sent by ``consumers.control_client.send_command`` on the bus reader's loop (``BusReader.submit``); the
page keeps the future in session state and the live header
shows what became of it: sending, the trainer's reply (accepted, or rejected and why), then
``applied at step N`` once the stream says so. A user the server does not allow to send
commands (the viewer role) is told so in words, and no success is shown. A finished run
(completed, stopped, failed) has no trainer to command: its controls are drawn disabled, with
the reason, until a resumed attempt starts.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
import streamlit as st
from nats.aio.client import Client as NATS

from consumers.control_client import NoTrainer, build_command, default_issuer, send_command
from dashboards.app import connection
from dashboards.app.denials import Denied
from dashboards.app.reader import BusReader
from dashboards.app.snapshot import RunSnapshot, RunSummary
from runtime.errors import ConfigError, TrainbusError
from schemas import Command, control_subject

ICONS = {
    "info": ":material/hourglass_top:",
    "success": ":material/check:",
    "warning": ":material/warning:",
    "error": ":material/block:",
}
COMMAND_TIMEOUT = 5.0
"""Seconds to wait for the trainer's answer to a command (as `trainbus ctl`)."""
SENT = "trainbus-sent-commands"
"""Session-state key: the commands this browser session sent (newest last)."""
KEEP = 4
DRAWN = "trainbus-panel-finished"
"""Session-state key prefix: whether the panel was last drawn for a finished run (per run)."""
SETTABLE_FIELDS: dict[str, tuple[str, str]] = {
    "learning_rate": ("learning rate", "float"),
    "max_grad_norm": ("max grad norm", "float"),
    "weight_decay": ("weight decay", "float"),
    "eval_steps": ("eval steps", "int"),
    "save_steps": ("save steps", "int"),
    "logging_steps": ("logging steps", "int"),
}


@dataclass(frozen=True)
class Outcome:
    """What became of a command sent from the dashboard (before the stream says ``applied``)."""

    command_id: str
    command: str
    status: str
    """``accepted``, ``rejected``, ``denied`` (the server refused this user), ``no_trainer``, ``error``."""
    message: str = ""
    code: str = ""
    step: int | None = None


async def ask_trainer(nc: NATS, command: Command) -> Outcome:
    """Send ``command`` as `trainbus ctl` does and say what the trainer answered (runs on the reader's loop)."""

    def outcome(status: str, message: str) -> Outcome:
        return Outcome(command.command_id, command.type, status, message)

    try:
        reply, _ = await send_command(nc, command, timeout=COMMAND_TIMEOUT)
    except NoTrainer as exc:
        return outcome("no_trainer", str(exc))
    except TrainbusError as exc:
        return outcome("error", str(exc))
    except (nats.errors.Error, ValueError) as exc:
        return outcome("error", str(exc) or type(exc).__name__)
    return Outcome(command.command_id, command.type, reply.status, reply.message, reply.code, reply.step)


def outcome_of(sent: Sent) -> Outcome | None:
    """The command's outcome once the future is done (a denied or unsent command included); None before."""
    if not sent.future.done():
        return None
    try:
        return sent.future.result()
    except Denied as exc:
        why = f"the server denied {exc.user} sending commands to {exc.subject} ({exc.detail})"
        return Outcome(sent.command_id, sent.what, "denied", why)
    except TrainbusError as exc:
        return Outcome(sent.command_id, sent.what, "error", str(exc))


@dataclass
class Sent:
    """A command this session sent, and the future of the trainer's answer."""

    run_id: str
    command_id: str
    what: str
    future: concurrent.futures.Future[Outcome]


def send(reader: BusReader, action: str, run_id: str, *, settings: Sequence[str] = (), save: bool = True) -> None:
    """Build and send one command; a bad value is shown as one line and nothing is sent."""
    try:
        command = build_command(action, run_id, issued_by=default_issuer(), settings=settings, save=save)
    except ConfigError as exc:
        st.error(f"Not sent: {exc}")
        return
    what = command.type + (" " + " ".join(settings) if settings else "")
    sent: list[Sent] = st.session_state.setdefault(SENT, [])
    future = reader.submit(lambda nc: ask_trainer(nc, command), publishes=[control_subject(run_id)])
    sent.append(Sent(run_id, command.command_id, what, future))
    del sent[:-KEEP]


def describe(sent: Sent, snap: RunSnapshot) -> tuple[str, str]:
    """(kind, text) for one sent command: kind is ``info``, ``success``, ``warning`` or ``error``."""
    outcome = outcome_of(sent)
    if outcome is None:
        return "info", f"{sent.what}: sent, waiting for the trainer's answer…"
    if outcome.status == "denied":
        return (
            "error",
            f"{sent.what}: not allowed. {outcome.message[0].upper()}{outcome.message[1:]}. Commands need the operator role.",
        )
    if outcome.status == "rejected":
        return "error", f"{sent.what}: rejected by the trainer ({outcome.code}): {outcome.message}"
    if outcome.status == "no_trainer":
        return "warning", f"{sent.what}: not delivered: {outcome.message}"
    if outcome.status != "accepted":
        return "error", f"{sent.what}: failed: {outcome.message}"
    row = snap.command(sent.command_id)
    if row is not None and row.status == "applied":
        return "success", f"{sent.what}: applied at step {row.applied_step}"
    return "info", f"{sent.what}: accepted at step {outcome.step}; applies at the next step boundary…"


def show_outcomes(snap: RunSnapshot) -> None:
    """What became of the commands this session sent to the run: the newest as a message, the
    ones before it as a line each."""
    mine = [sent for sent in reversed(st.session_state.get(SENT, [])) if sent.run_id == snap.run_id]
    for i, sent in enumerate(mine):
        kind, text = describe(sent, snap)
        if i == 0:
            {"info": st.info, "success": st.success, "warning": st.warning, "error": st.error}[kind](text)
        else:
            st.caption(f"{ICONS[kind]} {text}")


def _set_form(reader: BusReader, run_id: str, off: bool) -> None:
    with st.form(f"set-{run_id}", clear_on_submit=False, border=False):
        columns = st.columns(len(SETTABLE_FIELDS))
        values: dict[str, float | int | None] = {}
        for column, (name, (label, kind)) in zip(columns, SETTABLE_FIELDS.items(), strict=True):
            if kind == "float":
                values[name] = column.number_input(
                    label, value=None, min_value=0.0, format="%g", key=f"set-{name}", disabled=off
                )
            else:
                values[name] = column.number_input(
                    label, value=None, min_value=1, step=1, key=f"set-{name}", disabled=off
                )
        submitted = st.form_submit_button("Set", icon=":material/tune:", disabled=off)
    if submitted:
        chosen = [f"{name}={value!r}" for name, value in values.items() if value is not None]
        if not chosen:
            st.warning("Enter at least one value to set.")
        else:
            send(reader, "set", run_id, settings=chosen)


def _ask(key: str, value: bool) -> None:
    st.session_state[key] = value


def _confirm_stop(reader: BusReader, run_id: str, key: str, save: bool) -> None:
    st.session_state[key] = False
    send(reader, "stop", run_id, save=save)


def closed_because(run: RunSummary, reason: str) -> str | None:
    """Why the controls of ``run`` are off (a finished run has no trainer to command); None while it is not finished."""
    if not run.finished:
        return None
    why = f" ({reason})" if reason else ""
    return (
        f"Run **{run.run_id}** {run.state} at step {run.step}{why}: no trainer listens to it, so its controls are off. "
        f"`trainbus train --resume {run.run_id}` continues it from its last checkpoint."
    )


def redraw_when_finished_changes(run: RunSummary) -> None:
    """Called by the live header: redraw the page once when the run finishes (or a resumed attempt
    starts), so the panel turns its controls off (or on) at once, not at its next own redraw."""
    key = f"{DRAWN}-{run.run_id}"
    drawn = st.session_state.get(key)
    if drawn is not None and drawn != run.finished:
        st.session_state[key] = run.finished  # the app rerun draws this header before the panel: rerun once
        st.rerun(scope="app")


PANEL_SECONDS = 5.0
"""How often the panel redraws by itself. A full rerun of the page (a tab opened) that races the
header's own rerun can lose the panel's elements in Streamlit (streamlit#9188): a panel that only
redrew on its own clicks then stayed gone; now it is back within this long."""


@connection.live(PANEL_SECONDS)
def panel(reader: BusReader, run_id: str) -> None:
    """The buttons and the set form; a click reruns only this fragment. Off for a finished run."""
    confirm = f"confirm-stop-{run_id}"
    snap = reader.run(run_id)
    closed = closed_because(snap.summary, snap.reason) if snap is not None else None
    off = closed is not None
    st.session_state[f"{DRAWN}-{run_id}"] = off
    with st.container(border=True):
        st.caption(f"Control · sent as **{default_issuer()}** · the same commands as `trainbus ctl`")
        if closed is not None:
            st.info(closed, icon=":material/block:")
        buttons = st.columns(5)
        if buttons[0].button("Pause", icon=":material/pause:", width="stretch", disabled=off):
            send(reader, "pause", run_id)
        if buttons[1].button("Resume", icon=":material/play_arrow:", width="stretch", disabled=off):
            send(reader, "resume", run_id)
        if buttons[2].button("Save checkpoint", icon=":material/save:", width="stretch", disabled=off):
            send(reader, "save", run_id)
        if buttons[3].button("Evaluate", icon=":material/fact_check:", width="stretch", disabled=off):
            send(reader, "eval", run_id)
        # callbacks run before the rerun a click causes, so the prompt appears and goes at once
        buttons[4].button(
            "Stop", icon=":material/stop:", width="stretch", type="primary", on_click=_ask, args=(confirm, True),
            disabled=off,
        )  # fmt: skip
        if st.session_state.get(confirm) and not off:
            _stop_prompt(reader, run_id, confirm)
        with st.expander("Set hyper-parameters", icon=":material/tune:"):
            _set_form(reader, run_id, off)


def _stop_prompt(reader: BusReader, run_id: str, confirm: str) -> None:
    st.warning(f"Stop run **{run_id}**? The trainer ends it at the next step boundary.")
    save = st.checkbox("save a checkpoint first", value=True, key=f"stop-save-{run_id}")
    yes, no = st.columns(2)
    yes.button(
        "Confirm stop", type="primary", width="stretch", on_click=_confirm_stop, args=(reader, run_id, confirm, save)
    )
    no.button("Cancel", width="stretch", on_click=_ask, args=(confirm, False))
