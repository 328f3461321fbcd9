"""The Runs page: every run with its state, progress, loss, accuracy and checkpoints; a run's name
links to its page (``/run?run=RUN``)."""

from __future__ import annotations

import time

import streamlit as st

from dashboards.app import connection
from dashboards.app.reader import BusReader
from dashboards.app.tables import RUN_LINK_TEXT, STATES, filter_runs, runs_table, sweep_names

COLUMNS = {
    "run": st.column_config.LinkColumn("run", display_text=RUN_LINK_TEXT, help="opens the run's page"),
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "loss": st.column_config.NumberColumn("loss", format="%.4f"),
    "best accuracy": st.column_config.NumberColumn("best accuracy", format="%.3f"),
}


@connection.live(connection.CHART_SECONDS)
def runs_list(reader: BusReader, states: tuple[str, ...], name: str, sweep: str = "") -> None:
    """The table, refreshed every second; a run's name opens its page."""
    overview = reader.overview()
    if not overview.runs:
        st.info("No runs yet. Start one with `trainbus train configs/tiny.yaml`; it appears here live.")
        return
    now = time.time()
    table = runs_table(filter_runs(overview.runs, now, states=states, name=name, sweep=sweep), now)
    st.caption(f"{len(table)} of {len(overview.runs)} runs · click a run's name to open it")
    st.dataframe(table, key="runs-table", hide_index=True, column_config=COLUMNS, width="stretch")


def render() -> None:
    st.title("Runs")
    reader = connection.reader()
    left, middle, right = st.columns([3, 2, 2])
    states = left.multiselect("State", STATES, key="runs-states", placeholder="every state")
    name = middle.text_input("Run name contains", key="runs-name", placeholder="e.g. demo")
    sweeps = sweep_names(reader.overview().runs)
    sweep = right.selectbox("Sweep", ["", *sweeps], key="runs-sweep", format_func=lambda s: s or "every run")
    runs_list(reader, tuple(states), name, sweep or "")


if __name__ == "__main__":
    connection.guarded(render)
