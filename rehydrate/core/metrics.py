"""Prometheus metrics: Temporal's runtime serves them; rehydrate adds its own through the same meter.

Names (the exporter adds no `_total` suffix): `rehydrate_events_applied` (counter, by projection; replay chunks,
catch-up, swap and tail), `rehydrate_chunk_duration_seconds` (histogram), `rehydrate_tail_lag_events` and
`rehydrate_tail_lag_seconds` (gauges), `rehydrate_replay_phase` (gauge, set by the replay workflow: the index of
its phase in `workflows.replay.PHASES`), `rehydrate_dead_letters` (counter). Activity metrics also carry
Temporal's labels (namespace, task_queue, activity_type, …).
"""

from __future__ import annotations

from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from rehydrate.core.errors import UserError

EVENTS_APPLIED = "rehydrate_events_applied"
CHUNK_DURATION = "rehydrate_chunk_duration_seconds"
TAIL_LAG_EVENTS = "rehydrate_tail_lag_events"
TAIL_LAG_SECONDS = "rehydrate_tail_lag_seconds"
DEAD_LETTERS = "rehydrate_dead_letters"


def prometheus_runtime(port: int, host: str = "0.0.0.0") -> Runtime:
    """A Temporal runtime that serves `/metrics` on host:port; clients connected with it report there."""
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"{host}:{port}")))
    except Exception as error:
        raise UserError(
            f"cannot serve metrics on {host}:{port}: {error}",
            fix="pick a free port with --metrics-port or REHYDRATE_METRICS_PORT",
        ) from None


def _meter() -> MetricMeter | None:
    """The current activity's meter (labelled with the activity), or None outside a worker's activity."""
    try:
        return activity.metric_meter()
    except RuntimeError:
        return None


def events_applied(projection: str, count: int) -> None:
    meter = _meter()
    if meter is not None and count:
        meter.create_counter(EVENTS_APPLIED, "Events applied to read models").add(count, {"projection": projection})


def chunk_duration(projection: str, seconds: float) -> None:
    meter = _meter()
    if meter is not None:
        meter.create_histogram_float(CHUNK_DURATION, "Seconds per replay chunk", "s").record(
            seconds, {"projection": projection}
        )


def tail_lag(projection: str, events: int, seconds: float) -> None:
    meter = _meter()
    if meter is not None:
        meter.create_gauge(TAIL_LAG_EVENTS, "Events the active read model does not have yet").set(
            events, {"projection": projection}
        )
        meter.create_gauge_float(TAIL_LAG_SECONDS, "Age of the oldest event not applied yet", "s").set(
            seconds, {"projection": projection}
        )


def declare(runtime: Runtime, projections: list[str]) -> None:
    """Export the dead-letter counter at 0 for each projection, so dashboards and alerts see it from the start."""
    counter = runtime.metric_meter.create_counter(DEAD_LETTERS, "Events a projection could not apply")
    for projection in projections:
        counter.add(0, {"projection": projection})
