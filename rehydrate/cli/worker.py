"""`rehydrate worker`: a worker process for replays, tails, verifies and snapshot rebuilds."""

from __future__ import annotations

from typing import Annotated

import typer

from rehydrate.cli import _common as c

app = typer.Typer()


@app.command("worker")
def worker(
    max_concurrent_activities: Annotated[int | None, typer.Option(help="Chunks this worker runs at once.")] = None,
    tails: Annotated[
        bool | None, typer.Option("--tails/--no-tails", help="Start the tails of active projections (default: on).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (REHYDRATE_METRICS_PORT).")
    ] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object a line.")] = False,
    tracing: Annotated[
        str | None,
        typer.Option(help="OpenTelemetry tracing: otlp, console or off (REHYDRATE_TRACING; needs rehydrate[otel])."),
    ] = None,
) -> None:
    """Run a worker: replays, tails and their activities, until SIGINT or SIGTERM."""
    from rehydrate.worker import run_worker

    settings = c.settings(
        max_concurrent_activities=max_concurrent_activities,
        tails=tails,
        metrics_port=metrics_port,
        log_format="json" if log_json else None,
        tracing=tracing,
    )
    c.log_as_configured(settings)
    registry = c.projections(settings)
    c.run(lambda: run_worker(settings, registry))
