"""The Checkpoints & audit page: every checkpoint with its verdict, reasons, metrics, sha256
and path (★ marks the audit gate's best), which checkpoint each predictor serves under which
alias since when (``predictor.loaded``), and the feed of audit flags by severity."""

from __future__ import annotations

import streamlit as st

from dashboards.app import connection
from dashboards.app.reader import BusReader
from dashboards.app.tables import checkpoints_table, flags_table, loads_table, serving_table

SEVERITIES = ("critical", "warning", "info")
VERDICTS = ("approved", "rejected", "pending")


@connection.live(connection.CHART_SECONDS)
def tables(reader: BusReader, run_ids: tuple[str, ...], verdicts: tuple[str, ...], severities: tuple[str, ...]) -> None:
    """Both tables, refreshed every second."""
    snaps = [snap for run_id in run_ids if (snap := reader.run(run_id)) is not None]
    checkpoints = checkpoints_table(snaps)
    if verdicts:
        checkpoints = checkpoints[checkpoints["verdict"].isin(verdicts)]
    st.subheader("Checkpoints")
    if checkpoints.empty:
        st.info("No checkpoint yet.")
    else:
        st.dataframe(checkpoints, hide_index=True, width="stretch", key="checkpoints")
        st.caption("★ the audit gate's best approved checkpoint of the run; only approved checkpoints are promotable.")
    st.subheader("Served by predictors")
    serving = serving_table(snaps)
    if serving.empty:
        st.info("No predictor has loaded a checkpoint of these runs: `trainbus serve --run RUN` serves the best one.")
    else:
        st.dataframe(serving, hide_index=True, width="stretch", key="serving")
        st.caption(
            "The checkpoint each predictor replica loaded last, under which alias, since when. A replica that has "
            "stopped keeps its row; the Try-it page lists the aliases answering now."
        )
        with st.expander("Every load"):
            st.dataframe(loads_table(snaps), hide_index=True, width="stretch")
    st.subheader("Audit flags")
    flags = flags_table(snaps, severities)
    if flags.empty:
        st.info("No audit flag.")
    else:
        st.dataframe(flags, hide_index=True, width="stretch", key="flags")


def render() -> None:
    st.title("Checkpoints & audit")
    reader = connection.reader()
    runs = sorted(reader.overview().runs, key=lambda r: r.first_event_time, reverse=True)
    ids = [r.run_id for r in runs]
    if not ids:
        connection.wait_for_run(reader, None, "No runs yet: checkpoints and audit flags appear here as runs make them.")
        return
    wanted = st.query_params.get("run")
    run_filter, verdict_filter, severity_filter = st.columns(3)
    chosen = run_filter.multiselect("Runs", ids, default=[wanted] if wanted in ids else [], placeholder="every run")
    verdicts = verdict_filter.multiselect("Verdict", VERDICTS, placeholder="every verdict")
    severities = severity_filter.multiselect("Flag severity", SEVERITIES, placeholder="every severity")
    tables(reader, tuple(chosen or ids), tuple(verdicts), tuple(severities))


if __name__ == "__main__":
    connection.guarded(render)
