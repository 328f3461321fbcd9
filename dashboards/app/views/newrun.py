"""The New run page: pick a config from ``configs/`` or paste YAML, add overrides, slots and
priority, and queue it for an agent (`trainbus submit`); a mistake is shown here before anything
is queued, and a queued run links to its Run page, live as soon as an agent starts it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards.app import connection
from dashboards.app.submitting import (
    Submitted,
    overrides_of,
    pasted_config,
    run_configs,
    submit,
    submit_argv,
)
from runtime.settings import Settings, load_config
from schemas.jobs import PRIORITIES

# Session-state key (a comment, not a docstring: Streamlit's magic would draw it): the last submit's result.
LAST = "trainbus-newrun-last"
RUN_PAGE = "views/run.py"
PICK, PASTE = "A config from configs/", "Paste YAML"


def config_choice() -> str | None:
    """The config to submit: a shipped one's name, or a file holding the pasted YAML."""
    how = st.radio("Config", [PICK, PASTE], horizontal=True, key="newrun-how")
    if how == PICK:
        configs = run_configs()
        return st.selectbox("Run config", configs, index=configs.index("configs/tiny.yaml") if "configs/tiny.yaml" in configs else 0, key="newrun-config")  # fmt: skip
    text = st.text_area(
        "YAML", height=240, key="newrun-yaml", placeholder="run_name: mine\nmodel:\n  name_or_path: tiny\n…"
    )
    st.caption(
        "Relative paths in pasted YAML are relative to the dashboard's state folder; name data files by absolute paths."
    )
    if not text.strip():
        return None
    return str(pasted_config(text, Path(load_config(Settings).state_dir) / "submitted"))


def form() -> None:
    config = config_choice()
    overrides = st.text_area("Overrides, one KEY=VALUE per line", key="newrun-overrides",
                             placeholder="training.max_steps=200\ntraining.learning_rate=1e-3")  # fmt: skip
    left, middle, right = st.columns(3)
    run_id = left.text_input("Run id (optional)", key="newrun-run-id", placeholder="<run_name>-<timestamp>")
    slots = int(middle.number_input("Slots", min_value=1, max_value=64, value=1, key="newrun-slots"))
    priority = right.radio("Priority", PRIORITIES, index=1, horizontal=True, key="newrun-priority")
    if st.button("Submit", type="primary", disabled=config is None, key="newrun-submit"):
        argv = submit_argv(config or "", overrides_of(overrides), slots=slots, priority=priority, run_id=run_id.strip())
        with st.spinner("Checking the config and queueing…"):
            st.session_state[LAST] = submit(argv)


def outcome() -> None:
    result: Submitted | None = st.session_state.get(LAST)
    if result is None:
        return
    if not result.ok:
        st.error(f"Not queued: {result.message}")
        return
    st.success(f"Queued job {result.job_id} for run {result.run_id}.")
    st.page_link(RUN_PAGE, label=f"Follow run {result.run_id}", icon=":material/monitoring:",
                 query_params={"run": result.run_id})  # fmt: skip
    st.caption("The Queue page shows where it stands until an agent starts it.")


def render() -> None:
    st.title("New run")
    form()
    outcome()


if __name__ == "__main__":
    connection.guarded(render)
