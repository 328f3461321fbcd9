"""The Run page's "Fork from here": one of the run's checkpoints, hyper-parameters to change, and
the fork queued for an agent (`trainbus submit --fork RUN@STEP`), as an operator would from a shell.

The form runs `trainbus submit` itself (``dashboards.app.submitting``): the fork's config is checked
by the trainer's own code before anything is queued, and a user whose role may not submit is told
what the server said.
"""

from __future__ import annotations

import streamlit as st

from dashboards.app.snapshot import RunSnapshot
from dashboards.app.submitting import Submitted, overrides_of, submit, submit_argv

FORKED = "trainbus-fork-last"
"""Session-state key: the last fork this session queued (its ``Submitted``)."""
EDITABLE = {
    "training.learning_rate": "learning rate",
    "training.max_steps": "max steps",
    "training.weight_decay": "weight decay",
    "training.seed": "seed",
}
RUN_PAGE = "views/run.py"


def fork_argv(run_id: str, step: int, changes: dict[str, str], extra: str, *, run: str, force: bool) -> list[str]:
    """`trainbus submit --fork RUN@STEP` with the changed values (empty ones left out) and extra ``KEY=VALUE`` lines."""
    items = [f"{key}={value}" for key, value in changes.items() if value.strip()] + overrides_of(extra)
    argv = submit_argv(None, items, slots=1, priority="normal", run_id=run)  # a fork trains with its parent's config
    return [*argv, "--fork", f"{run_id}@{step}", *(["--force"] if force else [])]


def form(snap: RunSnapshot) -> None:
    steps = sorted({c.step for c in snap.checkpoints})
    if not steps:
        st.caption("Fork from here: this run has no checkpoint yet.")
        return
    with st.form(f"fork-{snap.run_id}", border=True):
        st.markdown("**Fork from here**: a new run from one of these checkpoints, with its config and your changes")
        step = st.selectbox("Checkpoint step", steps, index=len(steps) - 1, key=f"fork-step-{snap.run_id}")
        columns = st.columns(len(EDITABLE))
        changes = {key: col.text_input(label, key=f"fork-{key}-{snap.run_id}", placeholder="as the parent")
                   for col, (key, label) in zip(columns, EDITABLE.items(), strict=True)}  # fmt: skip
        extra = st.text_area("Other changes, one KEY=VALUE per line", key=f"fork-extra-{snap.run_id}")
        left, right = st.columns(2)
        run = left.text_input("New run id (optional)", key=f"fork-run-{snap.run_id}")
        force = right.checkbox("Fork even if the audit gate rejected it", key=f"fork-force-{snap.run_id}")
        if st.form_submit_button("Fork from here", type="primary"):
            with st.spinner("Checking the fork and queueing it…"):
                st.session_state[FORKED] = submit(
                    fork_argv(snap.run_id, int(step), changes, extra, run=run.strip(), force=force)
                )
    outcome()


def outcome() -> None:
    result: Submitted | None = st.session_state.get(FORKED)
    if result is None:
        return
    if not result.ok:
        st.error(f"Not forked: {result.message}")
        return
    st.success(f"Queued job {result.job_id} for the fork {result.run_id}; an agent starts it.")
    st.page_link(
        RUN_PAGE, label=f"Follow {result.run_id}", icon=":material/call_split:", query_params={"run": result.run_id}
    )
