"""The Streamlit app's entry script: page setup, the bus banner and the navigation.

    trainbus dashboard            # serves this app on http://127.0.0.1:8501

A page is one module under ``views/`` with a ``render()`` function, plus one line in ``pages()``.
(Not ``pages/``: Streamlit would also serve a folder of that name as pages of its own, bypassing
this script when a link opens a page directly.)
"""

from __future__ import annotations

import streamlit as st

from dashboards.app import connection


def pages() -> list[st.Page]:
    """The navigation, in menu order: one line per page."""
    return [
        st.Page("views/runs.py", title="Runs", icon=":material/list:", default=True),
        st.Page("views/run.py", title="Run", icon=":material/monitoring:"),
        st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("views/checkpoints.py", title="Checkpoints & audit", icon=":material/verified:"),
        st.Page("views/sweep.py", title="Sweeps", icon=":material/tune:"),
        st.Page("views/tryit.py", title="Try it", icon=":material/science:"),
        st.Page("views/queue.py", title="Queue", icon=":material/queue:"),
        st.Page("views/newrun.py", title="New run", icon=":material/add_circle:"),
    ]


@st.fragment(run_every=connection.LIVE_SECONDS)
def _banner() -> None:
    connection.guarded(lambda: connection.banner(connection.reader().overview(runs=False)))


def main() -> None:
    st.set_page_config(page_title="trainbus", page_icon=":material/model_training:", layout="wide")
    _banner()
    st.navigation(pages()).run()


if __name__ == "__main__":
    main()
