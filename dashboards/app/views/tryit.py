"""The Try-it page: a text in, the served model's answer out — decision, abstention, probability
per label, rationale and the checkpoint that answered — from any alias `trainbus serve` serves.

Which aliases are served is asked again every few seconds while the page is open; the question
and the discovery run on the bus reader's loop (``dashboards.app.predictions``) and the page
polls their futures in fragments, as the control panel does.
"""

from __future__ import annotations

import time

import streamlit as st

from consumers.predict.client import ServedAlias
from dashboards.app import connection, predictions
from dashboards.app.charts import probability_chart
from dashboards.app.reader import BusReader
from runtime.cli import demo
from schemas.predict import Answer

# Session-state keys (comments, not docstrings: Streamlit's magic would draw a bare string of a page
# script): this session's ``predictions.Discoveries``, its latest ``predictions.Asked``, the alias picked,
# the text, the picked alias's metadata keys with the values seen, and (prefix + key) the value picked for one.
DISCOVERY = "trainbus-tryit-discovery"
ASKED = "trainbus-tryit-asked"
ALIAS = "tryit-alias"
TEXT = "tryit-text"
SEEN = "trainbus-tryit-seen"
METADATA = "tryit-metadata-"
RUN_PAGE = "views/run.py"

# The texts offered to try, each with the decision the demo's model gives it: the README's examples,
# which `make demo` asks its served model too (tests/end_to_end/test_examples.py checks them all).
EXAMPLES: tuple[tuple[str, str], ...] = demo.EXAMPLES


def _describe(served: ServedAlias) -> str:
    steps = sorted(set(served.steps))
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}" if steps else "step ?"
    replicas = f"{len(served.replicas)} replica{'s' if len(served.replicas) != 1 else ''}"
    return f"{served.alias} — run {served.run_id}, {at}, {replicas}"


def _how_to_serve(reader: BusReader) -> str:
    best = sorted(reader.overview().best_runs)
    if not best:
        return predictions.HOW_TO_SERVE
    listed = ", ".join(f"`{run_id}`" for run_id in best[:5])
    return f"{predictions.HOW_TO_SERVE} Runs with an approved best checkpoint: {listed}, e.g. `trainbus serve --run {best[0]}`."


@connection.live(connection.LIVE_SECONDS)
def served(reader: BusReader) -> None:
    """The alias picker, from a discovery asked again every few seconds."""
    discoveries: predictions.Discoveries = st.session_state.setdefault(DISCOVERY, predictions.Discoveries())
    found, why = predictions.aliases_of(discoveries.current(lambda: predictions.discover(reader), time.monotonic()))
    if why:
        st.error(why)
    elif found is None:
        st.info("Looking for predictors on the bus…", icon=":material/search:")
    elif not found:
        st.info(f"No predictor is serving on this bus. {_how_to_serve(reader)}", icon=":material/cloud_off:")
    else:
        by_alias = {a.alias: a for a in found}
        alias = st.selectbox("Served model", list(by_alias), key=ALIAS, format_func=lambda a: _describe(by_alias[a]))
        metadata_fields(by_alias[alias].metadata_seen if alias in by_alias else {})


def metadata_fields(seen: dict[str, list[str]]) -> None:
    """One optional field per metadata key the served model was trained with, offering the values seen."""
    st.session_state[SEEN] = seen
    if not seen:
        return
    with st.expander("Metadata (optional)", icon=":material/label:"):
        st.caption(
            "The model was trained with these lines in its prompt, and without them: leave them empty to send the "
            "text alone (as `trainbus predict TEXT`), or pick what `trainbus predict --metadata KEY=VALUE` would send."
        )
        for key, values in seen.items():
            st.selectbox(key, ["", *values], key=METADATA + key, format_func=lambda v: v or "(none)")


def picked_metadata() -> dict[str, str]:
    """The metadata picked for the served model's keys (those left empty are not sent)."""
    seen: dict[str, list[str]] = st.session_state.get(SEEN, {})
    return {key: str(value) for key in seen if (value := st.session_state.get(METADATA + key))}


def _use_example(text: str) -> None:
    st.session_state[TEXT] = text


def examples() -> None:
    """The example texts, each a button that puts it in the text field."""
    st.caption("Examples")
    for column, (text, _) in zip(st.columns(len(EXAMPLES)), EXAMPLES, strict=True):
        column.button(text, key=f"tryit-example-{text}", on_click=_use_example, args=(text,), width="stretch")


def question(reader: BusReader) -> None:
    """The text and the Predict button; the answer is the ``answer`` fragment's to show."""
    with st.form("tryit-form"):
        text = st.text_area("Text", key=TEXT, height=120, placeholder=f"e.g. {EXAMPLES[0][0]}")
        rationale = st.checkbox("with a rationale (slower: it is generated token by token)", value=True)
        submitted = st.form_submit_button("Predict", icon=":material/send:", type="primary")
    if not submitted:
        return
    alias = st.session_state.get(ALIAS)
    if not text.strip():
        st.warning("Enter a text to classify.")
    elif alias is None:
        st.warning(f"No served model to ask. {_how_to_serve(reader)}")
    else:
        st.session_state[ASKED] = predictions.ask(
            reader, str(alias), text, rationale=rationale, metadata=picked_metadata()
        )


def _since(reader: BusReader, answer: Answer, alias: str) -> str:
    """``approved checkpoint, served as risk since 12:01:02`` from the run's ``predictor.loaded`` events."""
    snap = reader.run(answer.checkpoint.run_id)
    loads = [s for s in snap.serving if s.alias == alias and s.sha256 == answer.checkpoint.sha256] if snap else []
    if not loads:
        return ""
    first = min(loads, key=lambda s: s.time)
    forced = " (served with --force)" if first.forced else ""
    return f" · {first.verdict} checkpoint{forced}, served as {alias} since {first.time:%H:%M:%S} UTC"


def _show(reader: BusReader, answer: Answer, alias: str) -> None:
    top, p = max(((name, q) for name, q in answer.probabilities.items() if name != "null"), key=lambda x: x[1])
    columns = st.columns(3)
    columns[0].metric("decision", answer.decision or "abstain")
    columns[1].metric("most likely label", f"{top} · {p:.0%}")
    columns[2].metric("checkpoint", f"step {answer.checkpoint.step}")
    if answer.abstain:
        st.warning(
            "The model abstains: no label is likely enough (below `abstain_threshold` in the run's labels file), "
            "so it gives no decision.",
            icon=":material/do_not_disturb_on:",
        )
    chart = probability_chart(answer.probabilities, answer.decision)
    st.vega_lite_chart(chart.data, chart.spec, key="tryit-probabilities", width="stretch", height="content")
    st.markdown("**Rationale**")
    if answer.rationale is None:
        st.caption("Not asked for: tick “with a rationale”.")
    else:
        st.text(answer.rationale or "(empty)")
    ref = answer.checkpoint
    st.caption(
        f"Answered by run `{ref.run_id}`, checkpoint step {ref.step}, sha256 `{ref.sha256[:16]}…`{_since(reader, answer, alias)}"
    )
    st.page_link(
        RUN_PAGE, label=f"Open run {ref.run_id}", icon=":material/monitoring:", query_params={"run": ref.run_id}
    )


@connection.live(connection.LIVE_SECONDS)
def answer(reader: BusReader) -> None:
    """The answer to this session's latest text, once it is in."""
    asked: predictions.Asked | None = st.session_state.get(ASKED)
    if asked is None:
        return
    metadata = ", ".join(f"{k}={v}" for k, v in asked.metadata.items())
    st.caption(
        f"Asked `{asked.alias}`"
        + (f" with metadata {metadata}" if metadata else " with the text alone")
        + (", with a rationale" if asked.rationale else "")
    )
    st.text(asked.text if len(asked.text) <= 300 else asked.text[:299] + "…")
    reply = predictions.reply_of(asked)
    if reply is None:
        st.info(f"Waiting for {asked.alias}'s answer…", icon=":material/hourglass_top:")
    elif reply.answer is not None:
        _show(reader, reply.answer, asked.alias)
    elif reply.kind == "no_service":
        st.warning(reply.message)
    else:
        st.error(reply.message)


def render() -> None:
    st.title("Try it")
    st.caption("Ask a model that `trainbus serve` is serving: the same request as `trainbus predict`.")
    reader = connection.reader()
    served(reader)
    examples()
    question(reader)
    answer(reader)


if __name__ == "__main__":
    connection.guarded(render)
