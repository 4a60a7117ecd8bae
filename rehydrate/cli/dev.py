"""`rehydrate demo` and `rehydrate dev`: the whole stack on one machine, from PyPI alone."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Annotated, Any

import typer

from rehydrate.cli import _common as c
from rehydrate.cli.replay import print_result, watch
from rehydrate.core.database import create_pool, ensure_schema
from rehydrate.core.settings import Settings, redact_url
from rehydrate.core.temporal import connect_client
from rehydrate.devstack import dev_stack
from rehydrate.engine.importer import import_events
from rehydrate.engine.projections import Registry
from rehydrate.examples.orders import generate
from rehydrate.models import ReplayInput
from rehydrate.sources.store import EventStore
from rehydrate.starter import start_replay
from rehydrate.worker import run_worker, running_worker

app = typer.Typer()


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Events in the example history (loaded once, then reused).")] = 250_000,
    lanes: Annotated[
        int | None,
        typer.Option(help="Lanes per replay (default: REHYDRATE_LANES; unset: 8 by stream range, 4 by hash)."),
    ] = None,
) -> None:
    """Bring up Temporal and Postgres, load an order history, replay the example projections, then exit."""
    settings = c.settings()
    registry = c.projections(settings, c.DEMO_PROJECTIONS)
    c.run(lambda: _demo(settings, registry, events, lanes))


async def _demo(settings: Settings, registry: Registry, events: int, lanes: int | None) -> None:
    # The demo's worker runs in this process: its per-chunk log lines would break into the progress bars, which
    # say the same. Warnings and errors still show.
    logging.getLogger("rehydrate").setLevel(logging.WARNING)
    c.out.print("[bold]rehydrate demo[/]: starting Temporal (dev server) and Postgres …")
    async with AsyncExitStack() as stack:
        server, url = await stack.enter_async_context(dev_stack(settings))
        pool = await create_pool(url)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await ensure_schema(conn, settings.schema_name)
        store = EventStore(pool, settings.schema_name)
        existing = await store.head()
        if existing == 0:
            c.out.print(f"Loading an order history of {events:,} events …")
            report = await import_events(store, enumerate(generate(events), start=1), source="demo history")
            c.out.print(
                f"  imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.1f} s "
                f"({report.events_per_second:,.0f} events/s)"
            )
        else:
            c.out.print(f"Reusing the {existing:,} events already in the store ({settings.data_dir}).")
        client = await connect_client(settings)
        await stack.enter_async_context(running_worker(settings, registry, client=client, database_url=url))
        for projection in registry:
            handle = await start_replay(client, settings, ReplayInput(projection.name, lanes=lanes), attach=True)
            print_result(settings, await watch(handle, projection.name), handle)
        c.out.print(
            f"\nLook at the runs in the Temporal Web UI: run [bold]rehydrate dev[/] (it keeps the history in "
            f"{settings.data_dir}/temporal.db), then open {server.ui_url}/namespaces/{settings.temporal_namespace}"
            "/workflows\nQuery the read models: "
            "[bold]SELECT * FROM order_summary LIMIT 5;[/] and [bold]SELECT * FROM customer_stats LIMIT 5;[/]"
        )


@app.command()
def dev(
    worker: Annotated[bool, typer.Option(help="Also run a worker in this process.")] = True,
) -> None:
    """Run a Temporal dev server (Web UI included), Postgres and a worker on this machine until Ctrl-C."""
    settings = c.settings()
    c.log_as_configured(settings)
    registry = c.projections(settings, c.DEMO_PROJECTIONS)

    async def work() -> None:
        async with dev_stack(settings) as (server, url):
            c.out.print(f"Temporal: {server.address}   Web UI: {server.ui_url}")
            c.out.print(f"Postgres: {redact_url(url)}")
            c.out.print(f"Projections: {', '.join(registry.names()) or 'none'}   Ctrl-C to stop.")
            if worker:
                update: dict[str, Any] = {"database_url": url}
                if not settings.projections and not settings.aggregates:
                    update["aggregates"] = c.DEMO_AGGREGATES  # the example's, beside its projections
                await run_worker(settings.model_copy(update=update), registry)
            else:
                await asyncio.Event().wait()

    c.run(work)
