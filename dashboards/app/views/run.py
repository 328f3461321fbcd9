"""The Run page: one run, live: state, progress and tags, its tiles (``dashboards.app.tiles``),
control (off once the run finished), charts with markers, evaluation
(the metrics its task reports; a classifier's confusion matrix and per-label F1), config and live
hyper-parameters, the command history and the notes.

Opened as ``/run?run=<run_id>``. The header and the open tab are fragments that rerun on
their own; only the open tab is drawn. Control goes through ``dashboards.app.control_panel``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd
import streamlit as st

from dashboards.app import connection, control_panel, fork_form
from dashboards.app.charts import TRAIN_CHARTS, Chart, confusion_chart, eval_chart, reported, train_chart
from dashboards.app.lineage import children_line, children_of, parent_line, with_parent
from dashboards.app.reader import BusReader
from dashboards.app.snapshot import RunSnapshot
from dashboards.app.tables import (
    STATE_ICONS,
    age,
    checkpoints_table,
    commands_table,
    eval_table,
    hyperparameters_table,
    notes_table,
    per_label_table,
    state_of,
    tags_text,
)
from dashboards.app.tiles import run_tiles

TABS = ["Training", "Evaluation", "Checkpoints", "Config", "Commands", "Notes"]
MARKERS_NOTE = (
    "Dashed rules: commands applied (blue), resumed attempts (green), audit flags (red), notes (orange), "
    "non-finite values (purple), the step a fork starts from (brown)."
)


def _draw(chart: Chart, key: str) -> None:
    if chart.points == 0 and len(chart.spec.get("layer", [])) < 2:
        st.caption(f"{chart.title}: no data yet")
        return
    st.vega_lite_chart(chart.data, chart.spec, key=key, width="stretch", height=chart.spec.get("height", "content"))


def _grid(charts: list[tuple[str, Chart]], per_row: int = 2) -> None:
    for start in range(0, len(charts), per_row):
        for column, (key, chart) in zip(st.columns(per_row), charts[start : start + per_row], strict=False):
            with column:
                _draw(chart, key)


@connection.live(connection.LIVE_SECONDS)
def header(reader: BusReader, run_id: str) -> None:
    """State, progress and the latest values; the outcome of commands sent from this session."""
    snap = reader.run(run_id)
    if snap is None:
        return
    run, now = snap.summary, time.time()
    state = state_of(run, now)
    st.subheader(f"{STATE_ICONS.get(state, '')} {run_id} · {state}")
    if run.tags:
        with st.container(key="run-tags"):
            st.text(f"tags: {tags_text(run.tags)}")
    family = [parent_line(run), children_line(children_of(run_id, reader.overview().runs))]
    for line in filter(None, family):
        st.markdown(line)
    if run.max_steps:
        st.progress(min(1.0, run.step / run.max_steps), text=f"step {run.step} of {run.max_steps}")
    # a row that wraps rather than cut a value (st.metric ends one that does not fit with "…")
    with st.container(horizontal=True, horizontal_alignment="distribute", key="tiles"):
        for tile in run_tiles(snap, now):
            with st.container(key=tile.key, width="content"):
                st.metric(
                    tile.label,
                    tile.value,
                    tile.note,
                    delta_color="off",
                    delta_arrow="off",
                    help=tile.help,
                    width="content",
                )
    if state == "stalled":
        st.warning(
            f"No event from the trainer for {age(now - run.last_event_time)} (no heartbeat, no `run.finished`): "
            f"it may have died. `trainbus train --resume {run_id}` continues it from its last checkpoint."
        )
    elif snap.reason and state != "running":
        st.caption(f"{state}: {snap.reason}")
    control_panel.show_outcomes(snap)
    control_panel.redraw_when_finished_changes(run)


@connection.live(connection.CHART_SECONDS)
def training(reader: BusReader, run_id: str) -> None:
    """Loss, learning rate, grad norm, throughput and memory, thinned for display, with markers."""
    snap = reader.run(run_id)
    if snap is None:
        return
    charts = {name: train_chart(snap, name) for name in TRAIN_CHARTS}
    fork = snap.summary.fork
    parent = reader.run(fork.parent) if fork is not None else None
    if fork is not None and parent is not None and st.session_state.get(f"parent-history-{run_id}"):
        charts = {name: with_parent(chart, parent, name, fork.step) for name, chart in charts.items()}
    _grid([(f"train-{name}", chart) for name, chart in charts.items()])
    st.caption(MARKERS_NOTE)


def _pick_eval(snap: RunSnapshot) -> int:
    labels = ["latest"] + [f"step {e.step} ({e.trigger}, attempt {e.attempt})" for e in reversed(snap.evals)]
    choice = st.selectbox("Evaluation", labels, key=f"eval-pick-{snap.run_id}")
    return len(snap.evals) - 1 if choice in (None, "latest") else len(snap.evals) - labels.index(str(choice))


@connection.live(connection.CHART_SECONDS)
def evaluation(reader: BusReader, run_id: str) -> None:
    """Eval metrics over steps; the latest (or a chosen) eval's confusion matrix and per-label F1."""
    snap = reader.run(run_id)
    if snap is None:
        return
    if not snap.evals:
        st.info("No evaluation yet: the trainer evaluates every `eval_steps`, or press Evaluate.")
        return
    _grid([(f"eval-{name}", eval_chart(snap, name)) for name in reported(snap.evals)], per_row=3)
    if any(e.labels for e in snap.evals):  # a classifier's; a chat run has no labels to confuse
        point = snap.evals[_pick_eval(snap)]
        abstained = f", {point.num_abstained} abstained" if point.num_abstained is not None else ""
        left, right = st.columns([3, 2])
        with left:
            _draw(confusion_chart(point), "confusion")
        with right:
            st.markdown(f"**Per-label F1 at step {point.step}** ({point.num_samples} examples{abstained})")
            st.dataframe(per_label_table(point), hide_index=True, width="stretch")
    with st.expander("Every evaluation"):
        st.dataframe(eval_table(snap.evals), hide_index=True, width="stretch")


@connection.live(connection.CHART_SECONDS)
def checkpoint_list(reader: BusReader, run_id: str) -> None:
    """The run's checkpoints with their verdicts (★ the best)."""
    snap = reader.run(run_id)
    if snap is not None and snap.checkpoints:
        st.dataframe(checkpoints_table([snap]).drop(columns=["run"]), hide_index=True, width="stretch", key="run-checkpoints")  # fmt: skip
    elif snap is not None:
        st.info("No checkpoint yet: the trainer saves every `save_steps`, or press Save checkpoint.")


def checkpoints(reader: BusReader, run_id: str) -> None:
    """The checkpoints, and "Fork from here" (a form: it is not redrawn every second while it is filled in)."""
    checkpoint_list(reader, run_id)
    snap = reader.run(run_id)
    if snap is not None:
        fork_form.form(snap)


@connection.live(connection.CHART_SECONDS)
def config(reader: BusReader, run_id: str) -> None:
    """Live hyper-parameters, then the run's config as it started."""
    snap = reader.run(run_id)
    if snap is None:
        return
    left, right = st.columns([1, 2])
    with left:
        st.markdown("**Live hyper-parameters**")
        st.dataframe(hyperparameters_table(snap), hide_index=True, width="stretch")
        st.caption(f"model {snap.summary.model} · adapter {snap.summary.adapter} · config {snap.config_hash[:12]}")
    with right:
        st.markdown("**Config**")
        st.json(snap.summary.config, expanded=1)


def _history(
    reader: BusReader, run_id: str, build: Callable[[RunSnapshot], pd.DataFrame], empty: str, key: str
) -> None:
    snap = reader.run(run_id)
    if snap is None:
        return
    table = build(snap)
    if table.empty:
        st.info(empty)
    else:
        st.dataframe(table, hide_index=True, width="stretch", key=key)


@connection.live(connection.CHART_SECONDS)
def commands(reader: BusReader, run_id: str) -> None:
    """Every command sent to the run (from anyone), from the stream."""
    _history(reader, run_id, commands_table, "No command sent to this run yet.", "command-history")


@connection.live(connection.CHART_SECONDS)
def notes(reader: BusReader, run_id: str) -> None:
    """The run's notes (`trainbus note`), newest first; each is an orange rule on the charts."""
    empty = f'No note yet: `trainbus note {run_id} "what you tried and why"` adds one.'
    _history(reader, run_id, notes_table, empty, "notes")


def parent_toggle(reader: BusReader, run_id: str) -> None:
    """A fork's charts may show its parent's history up to the fork step, greyed."""
    snap = reader.run(run_id)
    fork = snap.summary.fork if snap is not None else None
    if fork is not None and reader.run(fork.parent) is not None:
        st.checkbox(f"Show {fork.parent}'s history up to step {fork.step} (grey)", key=f"parent-history-{run_id}")


def choose_run(reader: BusReader) -> str | None:
    """The run in ``?run=``, else the newest; a select box switches (and updates the URL)."""
    overview = reader.overview()
    runs = sorted(overview.runs, key=lambda r: r.first_event_time, reverse=True)
    ids = [r.run_id for r in runs]
    wanted = st.query_params.get("run")
    if wanted and wanted not in ids:
        message = (
            f"Run **{wanted}** was removed from the bus (`trainbus runs rm`); it reappears if it publishes again."
            if wanted in overview.removed
            else f"Waiting for run **{wanted}** to appear on the bus…"
        )
        connection.wait_for_run(reader, wanted, message)
        return None
    if not ids:
        connection.wait_for_run(reader, None, "No runs yet. Start one with `trainbus train configs/tiny.yaml`.")
        return None
    current = wanted or ids[0]
    picked = st.selectbox("Run", ids, index=ids.index(current))
    if picked is not None and picked != wanted:
        st.query_params["run"] = picked
    return str(picked) if picked is not None else current


def render() -> None:
    reader = connection.reader()
    run_id = choose_run(reader)
    if run_id is None:
        return
    header(reader, run_id)
    control_panel.panel(reader, run_id)
    parts = {
        "Training": training, "Evaluation": evaluation, "Checkpoints": checkpoints, "Config": config,
        "Commands": commands, "Notes": notes,
    }  # fmt: skip
    for tab, name in zip(st.tabs(TABS, key="tab", bind="query-params"), TABS, strict=True):
        if tab.open:
            with tab:
                if name == "Training":
                    parent_toggle(reader, run_id)
                parts[name](reader, run_id)


if __name__ == "__main__":
    connection.guarded(render)
