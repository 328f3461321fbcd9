"""The exporter's prometheus-client ``Collector``: metric families built from state on each scrape.

Every metric is named ``trainbus_*`` with base units in the name; per-run metrics carry a
``run_id`` label, the exporter's own metrics (``trainbus_exporter_*``) do not. Non-finite values
(a diverged loss) are exported as NaN/+Inf/-Inf, which the exposition format allows.

Label values known in advance exist at 0 from the first scrape that shows a run (Prometheus'
guidance for labelled metrics: a series that appears only when it first counts breaks rates,
alerts and panels): every command × result, every audit rule of the rules file with its
severity, every checkpoint verdict, every run state and every event type.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from consumers.exporter.state import ExporterState, RunMetrics, expire
from runtime.lifecycle import RUN_STATES, STALL_AFTER_SECONDS, shown
from schemas import EVENT_TYPES
from schemas.commands import COMMAND_TYPES
from schemas.events import CommandStatus

COMMAND_RESULTS = [(command, result) for command in COMMAND_TYPES for result in get_args(CommandStatus)]
"""Every (command, result) label pair of ``trainbus_commands_total``: all exported, 0 included."""

TRAIN_GAUGES = {
    "loss": ("trainbus_train_loss", "Training loss at the latest logged step."),
    "learning_rate": ("trainbus_learning_rate", "Learning rate at the latest logged step."),
    "grad_norm": ("trainbus_grad_norm", "Gradient norm (before clipping) at the latest logged step."),
    "epoch": ("trainbus_epoch", "Fractional epoch at the latest logged step."),
    "tokens_per_second": ("trainbus_train_tokens_per_second", "Training throughput in tokens per second."),
    "samples_per_second": ("trainbus_train_samples_per_second", "Training throughput in samples per second."),
    "step_time_seconds": ("trainbus_train_step_duration_seconds", "Mean wall time of one optimizer step."),
    "memory_bytes": ("trainbus_memory_bytes", "Memory used by the trainer (accelerator or process RSS)."),
}
EVAL_GAUGES = {
    "loss": ("trainbus_eval_loss", "Evaluation loss of the latest evaluation."),
    "accuracy": ("trainbus_eval_accuracy_ratio", "Accuracy of the latest evaluation (0-1)."),
    "macro_f1": ("trainbus_eval_macro_f1", "Macro-averaged F1 of the latest evaluation (0-1)."),
    "abstain_rate": ("trainbus_eval_abstention_ratio", "Share of abstentions in the latest evaluation (0-1)."),
    "ece": ("trainbus_eval_calibration_error", "Expected calibration error of the latest evaluation."),
    "critical_error_cost": (
        "trainbus_eval_critical_error_cost",
        "Harm-weighted cost of critical confusions in the latest evaluation.",
    ),
    "text_only_accuracy": (
        "trainbus_eval_text_only_accuracy_ratio",
        "Accuracy of the latest evaluation asked with the text alone, without metadata (0-1).",
    ),
    "text_only_abstain_rate": (
        "trainbus_eval_text_only_abstention_ratio",
        "Share of abstentions in the latest evaluation asked with the text alone (0-1).",
    ),
    "step": ("trainbus_eval_step", "Global step of the latest evaluation."),
}
RUN = ["run_id"]

Samples = Iterable[tuple[Sequence[str], float]]
"""What one run adds to a family: (label values after ``run_id``, value) pairs."""


@dataclass(frozen=True)
class Scrape:
    """What a scrape renders with besides the runs: the clock and the settings."""

    now: float
    stall_after: float = STALL_AFTER_SECONDS
    audit_rules: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class RunFamily:
    """One per-run metric family (``run_id`` label first) and what each run contributes to it."""

    name: str
    doc: str
    samples: Callable[[RunMetrics, Scrape], Samples]
    labels: tuple[str, ...] = ()
    counter: bool = False

    def render(self, runs: Sequence[RunMetrics], scrape: Scrape) -> Metric:
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        family = kind(self.name, self.doc, labels=[*RUN, *self.labels])
        for run in runs:
            for labels, value in self.samples(run, scrape):
                family.add_metric([run.run_id, *labels], value)
        return family


def _with_zeros(
    counts: dict[tuple[str, str], int], known: Sequence[tuple[str, str]]
) -> list[tuple[tuple[str, str], int]]:
    """``counts`` plus a 0 for every label pair of ``known`` it lacks, sorted."""
    return sorted({**dict.fromkeys(known, 0), **counts}.items())


def _latest(values: Callable[[RunMetrics], dict[str, float]], key: str) -> Callable[[RunMetrics, Scrape], Samples]:
    def samples(run: RunMetrics, _: Scrape) -> Samples:
        found = values(run)
        return [((), found[key])] if key in found else []

    return samples


def _step(run: RunMetrics, _: Scrape) -> Samples:
    return [] if run.life.step is None else [((), run.life.step)]


def _info(run: RunMetrics, _: Scrape) -> Samples:
    started = run.life.started
    return [((started.model, started.adapter) if started is not None else ("", ""), 1)]


def _states(run: RunMetrics, scrape: Scrape) -> Samples:
    now = shown(run.life, scrape.now, scrape.stall_after)
    return [((name,), 1 if name == now else 0) for name in RUN_STATES]


def _hyperparameters(run: RunMetrics, _: Scrape) -> Samples:
    return [((name,), float(value)) for name, value in run.life.hyperparameters.items() if value is not None]


def _checkpoint_bytes(run: RunMetrics, _: Scrape) -> Samples:
    return [] if run.checkpoint_bytes is None else [((), run.checkpoint_bytes)]


def _events(run: RunMetrics, _: Scrape) -> Samples:
    return [((kind,), n) for kind, n in sorted({**dict.fromkeys(EVENT_TYPES, 0), **run.events}.items())]


RUN_FAMILIES: tuple[RunFamily, ...] = (
    *(RunFamily(name, doc, _latest(lambda r: r.train, key)) for key, (name, doc) in TRAIN_GAUGES.items()),
    *(RunFamily(name, doc, _latest(lambda r: r.eval, key)) for key, (name, doc) in EVAL_GAUGES.items()),
    RunFamily("trainbus_global_step", "Latest global optimizer step of the run's current attempt.", _step),
    RunFamily(
        "trainbus_run_attempt", "Attempt number of the run (1, +1 per resume).", lambda r, _: [((), r.life.attempt)]
    ),
    RunFamily(
        "trainbus_run_info",
        "Model and adapter of the run (value always 1).",
        _info,
        ("model", "adapter"),
    ),
    RunFamily("trainbus_run_state", "Run state: 1 for the current state, 0 for the others.", _states, ("state",)),
    RunFamily(
        "trainbus_hyperparameter",
        "Live hyper-parameter of the run: as it started, then as each train.step and applied set reports it.",
        _hyperparameters,
        ("hyperparameter",),
    ),
    RunFamily(
        "trainbus_last_event_timestamp_seconds",
        "Unix time of the run's newest event from any source (publisher clock).",
        lambda r, _: [((), r.life.last_event_time)],
    ),
    RunFamily(
        "trainbus_checkpoints",
        "Checkpoints of the run by audit verdict (pending: none yet).",
        lambda r, _: [((verdict,), n) for verdict, n in r.verdict_counts().items()],
        ("verdict",),
    ),
    RunFamily("trainbus_checkpoint_size_bytes", "Size of the run's newest checkpoint.", _checkpoint_bytes),
    RunFamily(
        "trainbus_audit_flags",
        "Audit flags raised on the run, by rule and severity.",
        lambda r, scrape: _with_zeros(r.audit_flags, scrape.audit_rules),
        ("rule", "severity"),
        counter=True,
    ),
    RunFamily(
        "trainbus_commands",
        "Control command outcomes (command.result events) by command and result.",
        lambda r, _: _with_zeros(r.commands, COMMAND_RESULTS),
        ("command", "result"),
        counter=True,
    ),
    RunFamily(
        "trainbus_events",
        "Events of the run seen by the exporter, by type (duplicates excluded).",
        _events,
        ("type",),
        counter=True,
    ),
)
"""Every per-run family, in exposition order: the state, step and attempt come from the run
lifecycle fold, as `trainbus runs` and the dashboard show them."""


def run_families(
    runs: list[RunMetrics],
    *,
    now: float,
    stall_after: float = STALL_AFTER_SECONDS,
    audit_rules: Sequence[tuple[str, str]] = (),
) -> list[Metric]:
    """The per-run metric families (``run_id`` label) for ``runs`` at Unix time ``now``.

    ``audit_rules`` are the (rule, severity) pairs of the audit gate's rules file.
    """
    scrape = Scrape(now, stall_after, audit_rules)
    return [family.render(runs, scrape) for family in RUN_FAMILIES]


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=RUN + labels)


def predictor_families(runs: list[RunMetrics]) -> list[Metric]:
    """What each predictor alias serves (``predictor.loaded`` events), per run."""
    step = _gauge("trainbus_predictor_checkpoint_step", "Checkpoint step the predictor serves under alias.", ["alias"])
    loaded = _gauge(
        "trainbus_predictor_loaded_timestamp_seconds", "Unix time the alias's checkpoint was loaded.", ["alias"]
    )
    for run in runs:
        for alias, (ckpt_step, when) in sorted(run.served.items()):
            step.add_metric([run.run_id, alias], ckpt_step)
            loaded.add_metric([run.run_id, alias], when)
    return [step, loaded]


def exporter_families(state: ExporterState) -> list[Metric]:
    """The exporter's own metric families (no ``run_id``: they describe this process)."""
    lag = HistogramMetricFamily(
        "trainbus_exporter_event_lag_seconds",
        "Time from an event's timestamp to the exporter handling it (live events, not the replayed backlog).",
        buckets=state.lag.cumulative(),
        sum_value=state.lag.total,
    )
    return [
        CounterMetricFamily(
            "trainbus_exporter_invalid_events",
            "Messages that failed validation (logged and acked).",
            state.invalid_events,
        ),
        CounterMetricFamily(
            "trainbus_exporter_newer_schema_events",
            "Events written by a newer trainbus (schema_version above this exporter's), skipped.",
            state.newer_events,
        ),
        CounterMetricFamily(
            "trainbus_exporter_duplicate_events",
            "Events delivered again and not counted twice.",
            state.duplicate_events,
        ),
        CounterMetricFamily(
            "trainbus_exporter_ignored_events", "Events of runs that had already expired.", state.ignored_events
        ),
        CounterMetricFamily(
            "trainbus_exporter_expired_runs",
            "Runs dropped from /metrics after --expire-after without an event.",
            state.expired_runs,
        ),
        GaugeMetricFamily("trainbus_exporter_runs", "Runs currently exported.", len(state.runs)),
        GaugeMetricFamily(
            "trainbus_exporter_caught_up",
            "1 once the stream's backlog has been replayed, else 0.",
            int(state.caught_up),
        ),
        lag,
    ]


class RunCollector:
    """Collector over an ``ExporterState`` that the consumer loop updates under ``lock``.

    Each scrape first expires runs silent for ``expire_after`` seconds, then renders; a live run
    whose trainer has been silent for ``stall_after`` seconds is shown as ``stalled``.
    """

    def __init__(
        self,
        state: ExporterState,
        lock: threading.Lock,
        *,
        expire_after: float,
        stall_after: float = STALL_AFTER_SECONDS,
        audit_rules: Sequence[tuple[str, str]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.lock = lock
        self.expire_after = expire_after
        self.stall_after = stall_after
        self.audit_rules = list(audit_rules)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        with self.lock:
            expire(self.state, now, self.expire_after)
            runs = list(self.state.runs.values())
            families = (
                run_families(runs, now=now, stall_after=self.stall_after, audit_rules=self.audit_rules)
                + predictor_families(runs)
                + exporter_families(self.state)
            )
        yield from families


def build_registry(collector: RunCollector) -> CollectorRegistry:
    """A fresh registry holding only ``collector`` (never the global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
