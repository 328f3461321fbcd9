"""The Compare page: chosen runs' loss and eval curves overlaid, and how their configs differ."""

from __future__ import annotations

import streamlit as st

from dashboards.app import connection
from dashboards.app.charts import compare_eval_chart, compare_train_chart, reported
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
    for start in range(0, len(charts), 2):
        for column, chart in zip(st.columns(2), charts[start : start + 2], strict=False):
            with column:
                if chart.points:
                    st.vega_lite_chart(chart.data, chart.spec, key=f"compare-{chart.title}", width="stretch")
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
    chosen = st.multiselect("Runs", ids, default=ids[:2], key="compare-runs")
    if not chosen:
        st.info("Choose the runs to compare.")
        return
    differences(reader, tuple(chosen))
    curves(reader, tuple(chosen))


if __name__ == "__main__":
    connection.guarded(render)
