"""The Sweep page: a hyper-parameter sweep's trials with their state, objective and parameters, the
objective per trial and against each parameter, and a link from each trial to its Run page.

The study comes from Optuna storage (the default ``<state_dir>/sweeps.db`` of ``trainbus sweep``,
or the URL typed on the page), read at most every ``STUDY_SECONDS`` for every session together;
the runs' progress comes from the shared bus reader, as on every page.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from consumers.sweep.study import storage_url, study_names, sweep_data
from dashboards.app import connection
from dashboards.app.charts import Chart
from dashboards.app.reader import BusReader
from dashboards.app.sweeps import objective_chart, parameter_chart, trials_table
from dashboards.app.tables import sweep_names
from runtime.errors import TrainbusError
from runtime.settings import Settings, load_config, redact_url

RUN_PAGE = "views/run.py"
STUDY_SECONDS = 2.0
"""How old the study shown may be: Optuna storage is read at most this often."""


@st.cache_data(ttl=STUDY_SECONDS, show_spinner=False, max_entries=16)
def _names(url: str) -> list[str]:
    return study_names(url)


@st.cache_data(ttl=STUDY_SECONDS, show_spinner=False, max_entries=32)
def _data(url: str, name: str) -> dict[str, Any] | None:
    return sweep_data(url, name)


def _draw(chart: Chart) -> None:
    if chart.points:
        st.vega_lite_chart(chart.data, chart.spec, key=f"sweep-{chart.title}", width="stretch")
    else:
        st.caption(f"{chart.title}: no trial has an objective yet")


def _link(trial: int | None, run_id: str, state: str) -> None:
    st.page_link(RUN_PAGE, label=f"trial {trial} · {run_id} ({state})", query_params={"run": run_id})


@connection.live(connection.CHART_SECONDS)
def trials(reader: BusReader, url: str, name: str) -> None:
    """The trials table, the charts and the links to the runs, refreshed every second."""
    runs = {r.run_id: r for r in reader.overview().runs}
    data = _data(url, name)
    if data is None:
        tagged = sorted((r for r in runs.values() if r.sweep == name), key=lambda r: r.trial or 0)
        st.info(
            f"Sweep {name} is not in {redact_url(url)}: its runs on the bus are below. "
            "Give the storage its driver used (`--storage`) to see the study."
        )
        for run in tagged:
            _link(run.trial, run.run_id, run.state)
        return
    table = trials_table(data, runs)
    best = f" · best: trial {data['best']}" if data["best"] is not None else ""
    st.caption(f"{len(table)} trials · {data['direction']} {data['metric']}{best}")
    st.dataframe(table, hide_index=True, key="sweep-trials", width="stretch")
    _draw(objective_chart(data))
    columns = st.columns(max(1, min(3, len(data["parameters"]))))  # one parameter chart beside the next
    for index, key in enumerate(data["parameters"]):
        with columns[index % len(columns)]:
            _draw(parameter_chart(data, key))
    st.markdown("**Open a trial's run**")
    for row in data["trials"]:
        if row["run_id"]:
            _link(row["trial"], row["run_id"], row["state"])


def render() -> None:
    st.title("Sweeps")
    reader = connection.reader()
    try:
        default = storage_url(load_config(Settings).state_dir)
    except TrainbusError as exc:
        st.error(f"trainbus dashboard: {exc}")
        return
    url = st.text_input("Optuna storage", value=default, key="sweep-storage", help="`trainbus sweep --storage`")
    try:
        names = sorted(set(_names(url)) | set(sweep_names(reader.overview().runs)))
    except TrainbusError as exc:
        st.error(str(exc))
        return
    if not names:
        st.info(
            "No sweeps yet. Start one with "
            "`trainbus sweep configs/tiny.yaml --space configs/sweeps/tiny.yaml --trials 8`; it appears here live."
        )
        return
    asked = st.query_params.get("sweep")
    name = st.selectbox("Sweep", names, index=names.index(asked) if asked in names else 0, key="sweep-name")
    st.query_params["sweep"] = name
    trials(reader, url, name)


if __name__ == "__main__":
    connection.guarded(render)
