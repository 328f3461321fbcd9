"""The Queue page: jobs waiting for an agent (with their place), running and finished, and the
live agents with their free slots; an operator cancels a job from here (as `trainbus cancel`)."""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime

import streamlit as st

from dashboards.app import connection
from dashboards.app.denials import Denied
from dashboards.app.queue import agents_table, jobs_table, live_agents
from dashboards.app.reader import BusReader
from runtime.errors import TrainbusError
from runtime.launch.jobs import Conflict
from runtime.launch.queue import cancel
from schemas.jobs import JobRecord
from schemas.subjects import JOBS_BUCKET

CANCELS = "trainbus-queue-cancels"
"""Session-state key: job id → the future of this session's cancel."""
JOB_COLUMNS = {
    "run": st.column_config.LinkColumn("run", display_text=r"run\?run=(.*)", help="opens the run's page"),
    "position": st.column_config.NumberColumn("position", help="its place among the waiting jobs"),
}


@connection.live(connection.CHART_SECONDS)
def queue_tables(reader: BusReader) -> None:
    """Jobs and agents, refreshed every second."""
    snap = reader.queue()
    now = datetime.now(UTC)
    if not snap.available:
        st.info("No launch queue on this bus yet: `trainbus submit CONFIG` (or the New run page) queues a job, "
                "`trainbus agent` runs them (`trainbus up` starts one).")  # fmt: skip
        return
    jobs = jobs_table(snap.jobs, now)
    st.subheader("Jobs")
    if jobs.empty:
        st.info("No jobs yet.")
    else:
        st.dataframe(jobs, hide_index=True, width="stretch", column_config=JOB_COLUMNS, key="queue-jobs")
    st.subheader("Agents")
    agents = live_agents(snap.agents, now)
    if agents:
        st.dataframe(agents_table(agents, now), hide_index=True, width="stretch", key="queue-agents")
    else:
        st.warning("No agent is running: waiting jobs start when one is (`trainbus agent`).")
    show_cancels()


def show_cancels() -> None:
    for job_id, future in st.session_state.get(CANCELS, {}).items():
        if not future.done():
            st.info(f"cancel {job_id}: sent…", icon=":material/hourglass_top:")
            continue
        try:
            record: JobRecord = future.result()
        except Denied as exc:
            st.error(f"cancel {job_id}: not allowed: the server denied {exc.user} ({exc.detail}). "
                     "Cancelling needs the operator role.")  # fmt: skip
            continue
        except TrainbusError as exc:
            st.error(f"cancel {job_id}: {exc}")
            continue
        said = "cancelled" if record.state == "cancelled" else f"its agent {record.agent} is stopping it"
        st.success(f"cancel {job_id}: {said}", icon=":material/check:")


def cancel_form(reader: BusReader) -> None:
    snap = reader.queue()
    open_jobs = sorted(r.spec.job_id for r in snap.jobs if not r.final)
    if not open_jobs:
        return
    with st.form("cancel-job", border=True):
        st.markdown("**Cancel a job**")
        left, right = st.columns([3, 2])
        job_id = left.selectbox("Job", open_jobs, key="cancel-job-id")
        save = right.checkbox("Save a checkpoint first (a running job)", value=True, key="cancel-save")
        if st.form_submit_button("Cancel job", type="primary") and job_id:
            futures: dict[str, concurrent.futures.Future[JobRecord]] = st.session_state.setdefault(CANCELS, {})
            futures[job_id] = reader.submit(
                lambda nc: _cancel(nc, job_id, save), publishes=[f"$KV.{JOBS_BUCKET}.{job_id}"]
            )


async def _cancel(nc: object, job_id: str, save: bool) -> JobRecord:
    try:
        return await cancel(nc.jetstream(), job_id, save=save)  # type: ignore[attr-defined]
    except Conflict as exc:
        raise TrainbusError(str(exc)) from None


def render() -> None:
    st.title("Queue")
    reader = connection.reader()
    queue_tables(reader)
    cancel_form(reader)


if __name__ == "__main__":
    connection.guarded(render)
