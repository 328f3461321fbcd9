"""The Compare page: chosen runs' loss and eval curves overlaid, and how their configs differ; or
the runs grouped by a key (a config key like ``adapter.r``, a tag, the sweep), each group drawn as
its mean with a band (std, min–max or 95 % CI), with every metric's mean, std, min and max."""

from __future__ import annotations

import streamlit as st

from dashboards.app import connection
from dashboards.app.charts import Chart, compare_eval_chart, compare_train_chart, reported
from dashboards.app.group_charts import (
    BAND_NAMES,
    candidate_keys,
    group_eval_chart,
    group_train_chart,
    groups_of,
    summary_table,
)
from dashboards.app.reader import BusReader
from dashboards.app.snapshot import RunSnapshot
from dashboards.app.tables import config_diff

OVERLAID_TRAIN = ("loss", "learning_rate")


def _snapshots(reader: BusReader, run_ids: tuple[str, ...]) -> list[RunSnapshot]:
    return [snap for run_id in run_ids if (snap := reader.run(run_id)) is not None]


@connection.live(connection.CHART_SECONDS)
def curves(reader: BusReader, run_ids: tuple[str, ...]) -> None:
    """Overlaid curves, one colour per run: the eval metrics any of them reports (perplexity of chat
    runs, accuracy and the rest of classifiers)."""
    snaps = _snapshots(reader, run_ids)
    charts = [compare_train_chart(snaps, name) for name in OVERLAID_TRAIN]
    charts += [compare_eval_chart(snaps, name) for name in reported(e for snap in snaps for e in snap.evals)]
    draw(charts, "compare")


def draw(charts: list[Chart], prefix: str) -> None:
    """Charts two to a row; an empty one says so."""
    for start in range(0, len(charts), 2):
        for column, chart in zip(st.columns(2), charts[start : start + 2], strict=False):
            with column:
                if chart.points:
                    st.vega_lite_chart(chart.data, chart.spec, key=f"{prefix}-{chart.title}", width="stretch")
                else:
                    st.caption(f"{chart.title}: no data yet")


def differences(reader: BusReader, run_ids: tuple[str, ...]) -> None:
    """The config keys whose values differ between the chosen runs."""
    snaps = _snapshots(reader, run_ids)
    diff = config_diff({s.run_id: s.summary.config for s in snaps})
    st.markdown("**How their configs differ**")
    if diff.empty:
        st.caption("Their configs are the same.")
    else:
        st.dataframe(diff, width="stretch", key="config-diff")


@connection.live(connection.CHART_SECONDS)
def group_view(reader: BusReader, run_ids: tuple[str, ...], key: str, band: str, shared: bool) -> None:
    """Each group's mean with its band, and the group table, refreshed every second."""
    groups = groups_of(_snapshots(reader, run_ids), key)
    if not groups:
        st.info(f"None of these runs has a value for {key}.")
        return
    sizes = ", ".join(f"{g} ({len(m)} run{'s' if len(m) != 1 else ''})" for g, m in groups.items())
    st.caption(f"Groups by {key}: {sizes}. At each step a group counts the runs that logged that step "
               "(the tooltip's n); nothing is interpolated.")  # fmt: skip
    st.dataframe(summary_table(groups, key), hide_index=True, width="stretch", key="group-table")
    members = [snap for snaps in groups.values() for snap in snaps]
    charts = [group_train_chart(groups, name, band, shared=shared) for name in OVERLAID_TRAIN]  # type: ignore[arg-type]
    evals = reported(e for snap in members for e in snap.evals)
    charts += [group_eval_chart(groups, name, band, shared=shared) for name in evals]  # type: ignore[arg-type]
    draw(charts, "group")


def groups_panel(reader: BusReader, ids: list[str]) -> None:
    summaries = [r for r in reader.overview().runs if r.run_id in ids]
    keys = candidate_keys(summaries)
    left, middle, right = st.columns([3, 2, 2])
    picked = left.selectbox("Group by", keys, key="compare-group-key", accept_new_options=True,
                            help="a config key (adapter.r), tag:NAME, or sweep; runs differing only in seed are members")  # fmt: skip
    band = middle.radio(
        "Band", list(BAND_NAMES), format_func=lambda b: BAND_NAMES[b], horizontal=True, key="compare-band"
    )
    shared = right.checkbox("Only steps every member logged", value=True, key="compare-shared")
    if picked:
        group_view(reader, tuple(ids), picked, band, shared)


def render() -> None:
    st.title("Compare runs")
    reader = connection.reader()
    runs = sorted(reader.overview().runs, key=lambda r: r.first_event_time, reverse=True)
    ids = [r.run_id for r in runs]
    if not ids:
        connection.wait_for_run(
            reader,
            None,
            "No runs yet. Start two with `trainbus train configs/tiny.yaml --set training.learning_rate=…`.",
        )
        return
    mode = st.radio("Compare", ["Runs", "Groups"], horizontal=True, key="compare-mode")
    if mode == "Groups":
        groups_panel(reader, ids)
        return
    chosen = st.multiselect("Runs", ids, default=ids[:2], key="compare-runs")
    if not chosen:
        st.info("Choose the runs to compare.")
        return
    differences(reader, tuple(chosen))
    curves(reader, tuple(chosen))


if __name__ == "__main__":
    connection.guarded(render)
