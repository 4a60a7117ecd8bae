"""The `rehydrate` command: demo, dev stack, worker, event import, replays and projections."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rehydrate.errors import UserError
from rehydrate.settings import Settings, load_settings

T = TypeVar("T")
DEMO_PROJECTIONS = ["rehydrate.examples.orders"]
DEMO_AGGREGATES = ["rehydrate.examples.order_aggregate"]

app = typer.Typer(
    help="rehydrate: durable, zero-downtime rebuilds of event-sourced read models, on Temporal and Postgres.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The event store's schema.", no_args_is_help=True)
events_app = typer.Typer(help="Load events into the event store.", no_args_is_help=True)
replay_app = typer.Typer(help="Start, watch and cancel replays.", no_args_is_help=True)
tail_app = typer.Typer(help="Start and stop the live tail that keeps a read model current.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")
app.add_typer(replay_app, name="replay")
schedule_app = typer.Typer(help="Periodic rebuilds on Temporal Schedules.", no_args_is_help=True)
app.add_typer(tail_app, name="tail")
app.add_typer(schedule_app, name="schedule")
snapshots_app = typer.Typer(help="Bulk rebuilds of aggregate snapshots.", no_args_is_help=True)
app.add_typer(snapshots_app, name="snapshots")
sandbox_app = typer.Typer(help="Sandbox builds (`rehydrate sandboxes` lists them).", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _settings(**overrides: Any) -> Settings:
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def _registry(settings: Settings, fallback: list[str] | None = None) -> Any:
    from rehydrate.projections import Registry

    return Registry.from_modules(settings.projections or fallback or [])


def _aggregates(settings: Settings) -> Any:
    from rehydrate.aggregates import AggregateRegistry

    return AggregateRegistry.from_modules(settings.aggregates)


def _configure_logs(settings: Settings) -> None:
    if settings.log_format == "json":
        from rehydrate.logs import configure

        configure(json=True)


def _run(work: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(work())  # type: ignore[arg-type]


# -- demo and dev ----------------------------------------------------------------------------------------


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Events in the example history (loaded once, then reused).")] = 250_000,
    lanes: Annotated[
        int | None,
        typer.Option(help="Lanes per replay (default: REHYDRATE_LANES; unset: 8 by stream range, 4 by hash)."),
    ] = None,
) -> None:
    """Bring up Temporal and Postgres, load an order history, replay the example projections, then exit."""
    settings = _settings()
    registry = _registry(settings, DEMO_PROJECTIONS)
    _run(lambda: _demo(settings, registry, events, lanes))


async def _demo(settings: Settings, registry: Any, events: int, lanes: int | None) -> None:
    from rehydrate.database import create_pool, ensure_schema
    from rehydrate.dev import dev_stack
    from rehydrate.examples.orders import generate
    from rehydrate.importer import import_events
    from rehydrate.models import ReplayInput
    from rehydrate.starter import start_replay
    from rehydrate.store import EventStore
    from rehydrate.temporal import connect_client
    from rehydrate.worker import running_worker

    # The demo's worker runs in this process: its per-chunk log lines would break into the progress bars, which
    # say the same. Warnings and errors still show.
    logging.getLogger("rehydrate").setLevel(logging.WARNING)
    out.print("[bold]rehydrate demo[/]: starting Temporal (dev server) and Postgres …")
    async with AsyncExitStack() as stack:
        server, url = await stack.enter_async_context(dev_stack(settings))
        pool = await create_pool(url)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await ensure_schema(conn, settings.schema_name)
        store = EventStore(pool, settings.schema_name)
        existing = await store.head()
        if existing == 0:
            out.print(f"Loading an order history of {events:,} events …")
            report = await import_events(store, enumerate(generate(events), start=1), source="demo history")
            out.print(
                f"  imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.1f} s "
                f"({report.events_per_second:,.0f} events/s)"
            )
        else:
            out.print(f"Reusing the {existing:,} events already in the store ({settings.data_dir}).")
        client = await connect_client(settings)
        await stack.enter_async_context(running_worker(settings, registry, client=client, database_url=url))
        for projection in registry:
            handle = await start_replay(client, settings, ReplayInput(projection.name, lanes=lanes), attach=True)
            result = await _watch(handle, projection.name)
            _print_result(settings, result, handle.id, handle.result_run_id)
        out.print(
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
    settings = _settings()
    _configure_logs(settings)
    registry = _registry(settings, DEMO_PROJECTIONS)

    async def work() -> None:
        from rehydrate.dev import dev_stack
        from rehydrate.settings import redact_url
        from rehydrate.worker import run_worker

        async with dev_stack(settings) as (server, url):
            out.print(f"Temporal: {server.address}   Web UI: {server.ui_url}")
            out.print(f"Postgres: {redact_url(url)}")
            out.print(f"Projections: {', '.join(registry.names()) or 'none'}   Ctrl-C to stop.")
            if worker:
                update: dict[str, Any] = {"database_url": url}
                if not settings.projections and not settings.aggregates:
                    update["aggregates"] = DEMO_AGGREGATES  # the example's, beside its projections
                await run_worker(settings.model_copy(update=update), registry)
            else:
                await asyncio.Event().wait()

    _run(work)


# -- worker and database -----------------------------------------------------------------------------------


@app.command("worker")
def worker_command(
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
    settings = _settings(
        max_concurrent_activities=max_concurrent_activities,
        tails=tails,
        metrics_port=metrics_port,
        log_format="json" if log_json else None,
        tracing=tracing,
    )
    _configure_logs(settings)
    registry = _registry(settings)
    if not len(registry) and not settings.aggregates:
        raise UserError(
            "no projections registered",
            fix="set REHYDRATE_PROJECTIONS=your.module[,other.module] (or REHYDRATE_AGGREGATES for snapshots only)",
        )
    from rehydrate.worker import run_worker

    _run(lambda: run_worker(settings, registry))


@db_app.command("init")
def db_init() -> None:
    """Create rehydrate's schema and tables (idempotent)."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.database import connect, ensure_schema, resolve_url
        from rehydrate.settings import redact_url

        url = resolve_url(settings)
        conn = await connect(url)
        try:
            await ensure_schema(conn, settings.schema_name)
        finally:
            await conn.close()
        out.print(f"schema {settings.schema_name!r} is ready in {redact_url(url)}")

    _run(work)


@db_app.command("grants")
def db_grants(
    role: Annotated[str, typer.Argument(help="The (existing) role the workers log in as.")],
    apply: Annotated[bool, typer.Option("--apply", help="Run the statements instead of printing them.")] = False,
) -> None:
    """The least privileges a worker's role needs: print them (or, with --apply, grant them as the owner)."""
    from rehydrate.database import grants_sql
    from rehydrate.identifiers import check_identifier

    settings = _settings()
    statements = grants_sql(settings.schema_name, settings.read_model_schema, check_identifier(role, "role"))
    if not apply:
        out.print(";\n".join(statements) + ";", soft_wrap=True)
        return

    async def work() -> None:
        from rehydrate.database import ready_pool, resolve_url

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool, pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                raise UserError(f"role {role!r} does not exist", fix=f"create it first: CREATE ROLE {role} LOGIN")
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement)
        out.print(f"granted role {role!r} what a rehydrate worker needs ({len(statements)} statements)")

    _run(work)


@events_app.command("import")
def events_import(
    file: Annotated[Path, typer.Argument(help="A JSON Lines file: one {stream_id, type, data, …} a line.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Events per COPY batch.")] = 20_000,
) -> None:
    """Import events from a JSON Lines file through COPY, all or nothing."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.database import ready_pool, resolve_url
        from rehydrate.importer import import_events, read_jsonl
        from rehydrate.store import EventStore

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            store = EventStore(pool, settings.schema_name)
            report = await import_events(store, read_jsonl(file), source=str(file), batch_size=batch_size)
        out.print(
            f"imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.2f} s "
            f"({report.events_per_second:,.0f} events/s)"
        )

    _run(work)


@events_app.command("check")
def events_check(as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
    """List every (event type, schema version) in the store; exit 1 if one has no upcaster path or no handler."""
    settings = _settings()
    registry = _registry(settings)
    aggregates = _aggregates(settings)

    async def work() -> list[Any]:
        from rehydrate.database import ready_pool, resolve_url
        from rehydrate.event_check import check_events
        from rehydrate.store import EventStore

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            return await check_events(EventStore(pool, settings.schema_name), registry, aggregates)

    report = _run(work)
    problems = [row for row in report if not row.ok]
    if as_json:
        _print_json([{**dataclasses.asdict(row), "ok": row.ok} for row in report])
    else:
        table = Table("event type", "version", "events", "handled by", "problem")
        for row in report:
            problem = "; ".join(
                (["no handler in any projection or aggregate"] if row.no_handler else []) + row.no_upcaster_path
            )
            table.add_row(
                escape(row.event_type),
                f"v{row.schema_version}",
                f"{row.events:,}",
                escape(", ".join(row.handled_by)) or "-",
                f"[red]{escape(problem)}[/]" if problem else "ok",
            )
        out.print(table)
        for row in problems:  # in full, below the table, which a narrow terminal truncates
            for problem in (["no handler in any projection or aggregate"] if row.no_handler else []) + (
                row.no_upcaster_path
            ):
                out.print(f"[red]{escape(row.event_type)} v{row.schema_version}[/]: {escape(problem)}", soft_wrap=True)
        out.print(
            f"{len(problems)} of {len(report)} (type, version) pairs have a problem"
            if problems
            else f"all {len(report)} (type, version) pairs can be read"
        )
    if problems:
        raise typer.Exit(1)


# -- replays -------------------------------------------------------------------------------------------------


@replay_app.command("start")
def replay_start(
    name: Annotated[str | None, typer.Argument(help="The projection to rebuild (or --stale).")] = None,
    lanes: Annotated[int | None, typer.Option(help="Key partitions applied in parallel (1-256).")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Events per chunk activity.")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Chunks running at once, over all lanes.")] = None,
    sandbox: Annotated[
        str | None, typer.Option(help="Build into schema rehydrate_sandbox_LABEL and never swap the live view.")
    ] = None,
    to_position: Annotated[
        int | None, typer.Option(help="Sandbox only: the read model of the events at or before this position.")
    ] = None,
    as_of: Annotated[
        str | None, typer.Option(help="Sandbox only: the read model of the events recorded at or before this time.")
    ] = None,
    allow_dead_letters: Annotated[
        bool, typer.Option("--allow-dead-letters", help="Swap even if the projection parked events.")
    ] = False,
    stale: Annotated[bool, typer.Option("--stale", help="Start one replay per STALE projection.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and wait for the swap.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Start a replay of NAME: build a new generation from the events, then swap it in (or build a sandbox)."""
    settings = _settings()
    registry = _registry(settings)

    from rehydrate.models import ReplayInput
    from rehydrate.starter import check_replay_input

    if stale == (name is not None):
        raise UserError("give a projection NAME or --stale (one of them)", fix="e.g. `rehydrate replay start orders`")
    if stale and (sandbox or to_position is not None or as_of):
        raise UserError("--stale rebuilds live projections", fix="leave out --sandbox, --to-position and --as-of")

    def input_for(projection: str) -> ReplayInput:
        return ReplayInput(
            projection,
            lanes=lanes,
            chunk_size=chunk_size,
            max_parallel=max_parallel,
            sandbox=sandbox,
            to_position=to_position,
            as_of=as_of,
            allow_dead_letters=allow_dead_letters,
        )

    if name is not None:
        check_replay_input(input_for(name), registry if len(registry) else None)  # before Temporal

    async def work() -> None:
        from rehydrate.starter import start_replay, wait_for_replay
        from rehydrate.temporal import connect_client

        names = [name] if name is not None else await _stale_names(settings, registry)
        if not names:
            out.print("no projection is stale")
            return
        client = await connect_client(settings)
        handles = []
        for projection in names:
            handle = await start_replay(
                client, settings, input_for(projection), registry=registry if len(registry) else None
            )
            handles.append((projection, handle))
            url = settings.workflow_url(handle.id, handle.result_run_id)
            if not wait and not as_json:
                out.print(f"started the replay of {projection}: {url}")
        if not wait:
            if as_json:
                _print_json(
                    [
                        {"projection": p, "workflow_id": h.id, "run_id": h.result_run_id} | {"url": _url(settings, h)}
                        for p, h in handles
                    ]
                    if stale
                    else {"workflow_id": handles[0][1].id, "run_id": handles[0][1].result_run_id}
                    | {"url": _url(settings, handles[0][1])}
                )
            return
        for projection, handle in handles:
            if as_json:
                _print_json(await wait_for_replay(handle))
                continue
            out.print(f"replay of [bold]{projection}[/]: {_url(settings, handle)}")
            _print_result(settings, await _watch(handle, projection), handle.id, handle.result_run_id)

    _run(work)


def _url(settings: Settings, handle: Any) -> str:
    return settings.workflow_url(handle.id, handle.result_run_id)


async def _stale_names(settings: Settings, registry: Any) -> list[str]:
    from rehydrate.database import ready_pool, resolve_url
    from rehydrate.operations import stale_projections

    async with ready_pool(resolve_url(settings), settings.schema_name) as pool, pool.acquire() as conn:
        return await stale_projections(conn, settings, registry)


@replay_app.command("plan")
def replay_plan(
    name: Annotated[str, typer.Argument(help="The projection.")],
    lanes: Annotated[
        int | None, typer.Option(help="Lanes (default: REHYDRATE_LANES; unset: 8 by stream range, 4 by hash).")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Events per chunk (default: REHYDRATE_CHUNK_SIZE).")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Chunks at once (default: REHYDRATE_MAX_PARALLEL).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show what a replay of NAME would do, changing nothing: events, lanes, chunks and an estimated duration."""
    settings = _settings()
    projection = _registry(settings).get(name)

    async def work() -> None:
        from rehydrate.database import ready_pool, resolve_url
        from rehydrate.operations import plan

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            p = await plan(pool, settings, projection, lanes=lanes, chunk_size=chunk_size, max_parallel=max_parallel)
        if as_json:
            _print_json(p)
            return
        chunks = sum(lane.chunks for lane in p.lanes)
        out.print(
            f"{name}: {p.events:,} events to read below high-water mark {p.mark}, {len(p.lanes)} lanes, "
            f"{chunks:,} chunks of up to {p.chunk_size:,} events, at most {p.max_parallel} at once"
        )
        for lane in p.lanes:
            out.print(f"  lane {lane.lane}: {lane.events:,} events, {lane.chunks:,} chunk{'s' * (lane.chunks != 1)}")
        out.print(
            f"  sample chunk: {p.sample_events:,} events read, folded and written in {p.sample_seconds:.3f} s "
            f"({p.events_per_second:,.0f} events/s, rolled back)"
        )
        if p.estimated_seconds is not None:
            out.print(
                f"  estimated build: {p.estimated_seconds:,.1f} s with {min(len(p.lanes), p.max_parallel)} chunks in "
                f"parallel on as many worker processes (one process is one core), plus indexes, catch-up and swap"
            )
        else:
            out.print("  estimated build: nothing to sample (no events)")

    _run(work)


@replay_app.command("status")
def replay_status_command(
    name: Annotated[str, typer.Argument(help="The projection.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the state of NAME's latest replay: progress while it runs, the result or error after."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import replay_status
        from rehydrate.temporal import connect_client

        status = await replay_status(await connect_client(settings), name)
        if as_json:
            _print_json(status)
            return
        out.print(f"{name}: {status.status.lower()}")
        if status.run_id:
            out.print(f"  {settings.workflow_url(status.workflow_id, status.run_id)}")
        if status.progress is not None:
            p = status.progress
            eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds is not None else ""
            out.print(
                f"  phase {p.phase}, generation {p.generation}: {p.events_applied:,} of {p.events_total:,} events"
                f" ({p.rate:,.0f}/s{eta})"
            )
            for lane in p.lanes:
                out.print(
                    f"    lane {lane.lane}: position {lane.position}, {lane.applied:,}/{lane.total:,}"
                    f"{' done' if lane.done else ''}"
                )
        if status.result is not None:
            r = status.result
            out.print(f"  generation {r.generation}: {r.events_applied:,} events in {r.seconds:.1f} s, {r.rows:,} rows")
        if status.error:
            out.print(f"  {status.error}")

    _run(work)


@replay_app.command("cancel")
def replay_cancel(
    name: Annotated[str, typer.Argument(help="The projection whose replay to cancel.")],
    sandbox: Annotated[str | None, typer.Option(help="Cancel the build into this sandbox instead.")] = None,
) -> None:
    """Cancel NAME's running replay: its half-built generation is dropped, the active one stays."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import cancel_replay
        from rehydrate.temporal import connect_client

        workflow_id = await cancel_replay(await connect_client(settings), name, sandbox)
        out.print(f"cancellation requested for {workflow_id}")

    _run(work)


@replay_app.command("pause")
def replay_pause(name: Annotated[str, typer.Argument(help="The projection whose replay to pause.")]) -> None:
    """Pause NAME's running replay after its running chunks (signal `pause`; the Web UI can send it too)."""
    _signal_replay(name, "pause")


@replay_app.command("resume")
def replay_resume(name: Annotated[str, typer.Argument(help="The projection whose replay to resume.")]) -> None:
    """Resume NAME's paused replay (signal `resume`)."""
    _signal_replay(name, "resume")


@replay_app.command("tune")
def replay_tune(
    name: Annotated[str, typer.Argument(help="The projection whose running replay to tune.")],
    max_parallel: Annotated[int, typer.Option(help="Chunks running at once, over all lanes, from the next chunk.")],
) -> None:
    """Change a running replay's --max-parallel; running chunks finish, the next ones start under the new bound."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import tune_replay
        from rehydrate.temporal import connect_client

        previous = await tune_replay(await connect_client(settings), name, max_parallel)
        out.print(f"replay of {name}: max_parallel {previous} → {max_parallel}")

    _run(work)


def _signal_replay(name: str, signal: str) -> None:
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import signal_replay
        from rehydrate.temporal import connect_client

        workflow_id = await signal_replay(await connect_client(settings), name, signal)
        out.print(f"{signal} sent to {workflow_id}")

    _run(work)


@tail_app.command("start")
def tail_start(name: Annotated[str, typer.Argument(help="The projection whose tail to start.")]) -> None:
    """Start NAME's tail: new events are applied to its active read model as they commit."""
    _tail_command(name, start=True)


@tail_app.command("stop")
def tail_stop(name: Annotated[str, typer.Argument(help="The projection whose tail to stop.")]) -> None:
    """Stop NAME's tail; workers do not start it again until `rehydrate tail start`."""
    _tail_command(name, start=False)


def _tail_command(name: str, *, start: bool) -> None:
    settings = _settings()

    async def work() -> None:
        from rehydrate.database import ready_pool, resolve_url
        from rehydrate.starter import start_tail, stop_tail
        from rehydrate.temporal import connect_client

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            client = await connect_client(settings)
            command = start_tail if start else stop_tail
            workflow_id = await command(client, pool, settings, name)
        verb = "started" if start else "stopped"
        out.print(f"tail of {name} {verb}: {settings.workflow_url(workflow_id)}")

    _run(work)


@snapshots_app.command("rebuild")
def snapshots_rebuild(
    aggregate_type: Annotated[str, typer.Argument(help="The aggregate type whose snapshots to rewrite.")],
    partitions: Annotated[int, typer.Option(help="Hash partitions of its streams, done in parallel.")] = 4,
    chunk_size: Annotated[int, typer.Option(help="Streams per chunk activity.")] = 500,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and wait for the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Rewrite the snapshot of every stream of AGGREGATE_TYPE (after its code changed), as a Temporal workflow."""
    settings = _settings()
    aggregates = _aggregates(settings)

    async def work() -> None:
        from rehydrate.models import SnapshotRebuildInput
        from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild
        from rehydrate.temporal import connect_client

        client = await connect_client(settings)
        input = SnapshotRebuildInput(aggregate_type, partitions=partitions, chunk_size=chunk_size)
        # Without REHYDRATE_AGGREGATES here, the workers' own list decides (the plan names an unknown type).
        handle = await start_snapshot_rebuild(
            client, settings, input, aggregates=aggregates if len(aggregates) else None
        )
        url = settings.workflow_url(handle.id, handle.result_run_id)
        if not wait:
            if as_json:
                _print_json({"workflow_id": handle.id, "run_id": handle.result_run_id, "url": url})
            else:
                out.print(f"started the snapshot rebuild of {aggregate_type}: {url}")
            return
        if as_json:
            _print_json(await wait_for_snapshot_rebuild(handle))
            return
        out.print(f"snapshot rebuild of [bold]{aggregate_type}[/]: {url}")
        with Progress(
            TextColumn(f"[bold]{aggregate_type}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10} streams/s"),
            TimeRemainingColumn(),
            console=out,
        ) as bar:
            task = bar.add_task(aggregate_type, total=None, rate="")

            def show(progress: Any) -> None:
                bar.update(
                    task,
                    total=progress.streams_total or None,
                    completed=progress.streams_done,
                    rate=f"{progress.rate:,.0f}",
                )

            result = await wait_for_snapshot_rebuild(handle, show)
        out.print(
            f"[green]✓[/] {result.streams:,} snapshots of {aggregate_type} in {result.seconds:.1f} s "
            f"({result.streams_per_second:,.0f} streams/s)"
        )

    _run(work)


@snapshots_app.command("status")
def snapshots_status(
    aggregate_type: Annotated[str, typer.Argument(help="The aggregate type.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the state of AGGREGATE_TYPE's latest snapshot rebuild and its progress while it runs."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import snapshot_rebuild_status
        from rehydrate.temporal import connect_client

        status, progress = await snapshot_rebuild_status(await connect_client(settings), aggregate_type)
        if as_json:
            _print_json({"status": status, "progress": progress})
            return
        out.print(f"{aggregate_type}: {status.lower()}")
        if progress is not None:
            out.print(f"  {progress.streams_done:,} of {progress.streams_total:,} streams ({progress.rate:,.0f}/s)")

    _run(work)


@snapshots_app.command("cancel")
def snapshots_cancel(aggregate_type: Annotated[str, typer.Argument(help="The aggregate type.")]) -> None:
    """Cancel AGGREGATE_TYPE's running snapshot rebuild; the snapshots written so far stay."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.starter import cancel_snapshot_rebuild
        from rehydrate.temporal import connect_client

        workflow_id = await cancel_snapshot_rebuild(await connect_client(settings), aggregate_type)
        out.print(f"cancellation requested for {workflow_id}")

    _run(work)


@app.command()
def projections(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List registered projections: version, active generation, rows, last replay."""
    settings = _settings()
    registry = _registry(settings)

    async def work() -> None:
        from rehydrate import catalog
        from rehydrate.database import ready_pool, resolve_url
        from rehydrate.starter import tail_state
        from rehydrate.store import EventStore
        from rehydrate.temporal import connect_client

        lags: dict[str, tuple[int, float]] = {}
        async with ready_pool(resolve_url(settings), settings.schema_name) as pool, pool.acquire() as conn:
            known = await catalog.projection_rows(conn, settings.schema_name)
            store = EventStore(pool, settings.schema_name)
            for name, row in known.items():
                if row.get("checkpoint") is not None and name in registry.names():
                    lags[name] = await catalog.lag(conn, store, registry.get(name), row["checkpoint"])
        tails: dict[str, tuple[str, str | None]] = {}
        try:
            client = await connect_client(settings)
            for name in known:
                tails[name] = await tail_state(client, name)
        except UserError:
            tails = {name: ("UNKNOWN (Temporal unreachable)", None) for name in known}
        rows: list[dict[str, Any]] = []
        for name in sorted(set(registry.names()) | set(known)):
            row = known.get(name, {})
            registered = name in registry.names()
            rows.append(
                {
                    "name": name,
                    "registered": registered,
                    "version": registry.get(name).version if registered else row.get("version"),
                    "active_generation": row.get("active_generation"),
                    # The active generation was built from other code (version, handlers, types, upcasters).
                    "stale": registered
                    and row.get("active_generation") is not None
                    and row.get("fingerprint") != registry.get(name).fingerprint,
                    "fingerprint": registry.get(name).fingerprint if registered else None,
                    "rows": row.get("rows_count"),
                    "checkpoint": row.get("checkpoint"),
                    "tail": {
                        "enabled": row.get("tail_enabled"),
                        "workflow": tails.get(name, ("NOT_STARTED", None))[0],
                        "error": row.get("tail_error") or tails.get(name, (None, None))[1],
                        "lag_events": lags[name][0] if name in lags else None,
                        "lag_seconds": round(lags[name][1], 3) if name in lags else None,
                    },
                    "last_replay": row.get("last_generation")
                    and {
                        "generation": row["last_generation"],
                        "state": row["last_state"],
                        "started_at": row["last_started"],
                        "ended_at": row["last_ended"],
                        "error": row["last_error"],
                    },
                }
            )
        if as_json:
            _print_json(rows)
            return
        table = Table("projection", "version", "active", "rows", "tail", "lag", "last replay")
        for r in rows:
            last = r["last_replay"]
            table.add_row(
                r["name"] + ("" if r["registered"] else " (not registered)"),
                str(r["version"] or "-"),
                (f"g{r['active_generation']}" if r["active_generation"] else "-")
                + (" [yellow]STALE[/]" if r["stale"] else ""),
                f"{r['rows']:,}" if r["rows"] is not None else "-",
                _tail_text(r["tail"]),
                f"{r['tail']['lag_events']:,} ev, {r['tail']['lag_seconds']:.1f} s"
                if r["tail"]["lag_events"] is not None
                else "-",
                f"g{last['generation']} {last['state']} {last['ended_at'] or last['started_at']:%Y-%m-%d %H:%M:%S}"
                if last
                else "never",
            )
        out.print(table)
        if any(r["stale"] for r in rows):
            out.print("STALE: built from other projection code; rebuild with `rehydrate replay start --stale`")
        for r in rows:
            if r["tail"]["error"]:
                out.print(f"[red]{r['name']}[/]: {escape(r['tail']['error'])}", soft_wrap=True)

    _run(work)


def _tail_text(tail: dict[str, Any]) -> str:
    if tail["error"]:
        return "FAILED"
    if tail["enabled"] is False:
        return "stopped"
    return str(tail["workflow"]).lower().replace("_", " ")


# -- generations, rollback, sandboxes, verify, dead letters ----------------------------------------------------


def _with_pool(work: Callable[[Any], Awaitable[T]]) -> T:
    settings = _settings()

    async def run() -> T:
        from rehydrate.database import ready_pool, resolve_url

        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            return await work(pool)

    return _run(run)


@app.command("generations")
def generations_command(
    name: Annotated[str, typer.Argument(help="The projection.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List NAME's generations: state, version, fingerprint, counts, timings and the run that built each."""
    settings = _settings()

    async def work(pool: Any) -> None:
        from rehydrate import catalog

        async with pool.acquire() as conn:
            rows = await catalog.generations(conn, settings.schema_name, name)
        if not rows:
            raise UserError(
                f"projection {name!r} has no generations", fix=f"build one: `rehydrate replay start {name}`"
            )
        if as_json:
            _print_json(rows)
            return
        table = Table(
            "gen", "state", "version", "fingerprint", "events", "rows", "parked", "built in", "started", "run"
        )
        for r in rows:
            table.add_row(
                f"g{r['generation']}",
                r["state"],
                str(r["version"]),
                r["fingerprint"],
                f"{r['events_applied']:,}",
                f"{r['rows_count']:,}" if r["rows_count"] is not None else "-",
                str(r["dead_letters"]),
                f"{r['build_seconds']:.1f} s" if r["build_seconds"] is not None else "-",
                f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                f"{r['workflow_id']} {r['run_id'] or ''}".strip(),
            )
        out.print(table)

    _with_pool(work)


@app.command("rollback")
def rollback_command(
    name: Annotated[str, typer.Argument(help="The projection.")],
    to: Annotated[int | None, typer.Option("--to", help="The retained generation (default: the previous one).")] = None,
) -> None:
    """Swap NAME's previous retained generation back in at once, then catch it up from its own checkpoint."""
    settings = _settings()
    projection = _registry(settings).get(name)

    async def work(pool: Any) -> None:
        from rehydrate.operations import rollback

        done = await rollback(pool, settings, projection, to)
        out.print(
            f"{name}: generation {done.to_generation} active again (was g{done.from_generation}), "
            f"{done.caught_up:,} events caught up from its checkpoint"
        )
        if done.fingerprint_differs:
            out.print(
                f"  note: g{done.to_generation} was built from other projection code than this process has; "
                "the tail applies new events with the workers' code"
            )

    _with_pool(work)


@app.command("sandboxes")
def sandboxes_command(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List sandbox builds: label, projection, state, cut-off, rows."""
    settings = _settings()

    async def work(pool: Any) -> None:
        from rehydrate import catalog

        async with pool.acquire() as conn:
            rows = await catalog.sandboxes(conn, settings.schema_name)
        if as_json:
            _print_json(rows)
            return
        table = Table("sandbox", "schema", "projection", "gen", "state", "as of", "rows")
        for r in rows:
            cutoff = (
                f"position {r['to_position']}"
                if r["to_position"] is not None
                else f"{r['as_of']:%Y-%m-%d %H:%M:%S%z}"
                if r["as_of"] is not None
                else f"mark {r['target_mark']}"
            )
            table.add_row(
                r["label"],
                catalog.sandbox_schema(r["label"]),
                r["projection"],
                f"g{r['generation']}",
                r["state"],
                cutoff,
                f"{r['rows_count']:,}" if r["rows_count"] is not None else "-",
            )
        out.print(table)

    _with_pool(work)


@sandbox_app.command("drop")
def sandbox_drop(label: Annotated[str, typer.Argument(help="The sandbox label.")]) -> None:
    """Drop sandbox LABEL: its schema and every build in it."""
    settings = _settings()

    async def work(pool: Any) -> None:
        from rehydrate import catalog

        async with pool.acquire() as conn:
            builds = await catalog.drop_sandbox(conn, settings.schema_name, label)
        out.print(f"sandbox {label} dropped ({builds} build(s), schema {catalog.sandbox_schema(label)})")

    _with_pool(work)


@app.command("verify")
def verify_command(
    name: Annotated[str, typer.Argument(help="The projection.")],
    keep: Annotated[bool, typer.Option("--keep", help="Keep the rebuilt sandbox (verify_NAME) to inspect.")] = False,
    show: Annotated[int, typer.Option(min=0, help="Differing keys to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Rebuild NAME into a sandbox at the live checkpoint and compare row hashes key by key; exit 1 on drift.

    Runs as the `Verify` workflow on the workers (as a schedule created with --verify-only does)."""
    settings = _settings()
    registry = _registry(settings)

    async def work() -> int:
        from rehydrate.operations import verify
        from rehydrate.temporal import connect_client

        client = await connect_client(settings)
        v = await verify(client, settings, name, keep=keep, show=show, registry=registry if len(registry) else None)
        if as_json:
            _print_json(v)
        elif v.differing == 0:
            out.print(
                f"[green]✓[/] {name}: generation {v.live_generation} equals a fresh rebuild at mark {v.mark} "
                f"({v.live_rows:,} rows)"
            )
        else:
            out.print(
                f"[red]✗[/] {name}: {v.differing:,} key(s) differ between generation {v.live_generation} "
                f"({v.live_rows:,} rows) and a rebuild at mark {v.mark} ({v.rebuilt_rows:,} rows)"
            )
            for drift in v.first:
                out.print(f"  {escape(drift.key)}: {drift.problem}")
        if v.stale and not as_json:
            out.print("  note: the live generation was built from other code (STALE): drift is expected")
        return 1 if v.differing else 0

    if _run(work):
        raise typer.Exit(1)


@app.command("dead-letters")
def dead_letters_command(
    words: Annotated[list[str], typer.Argument(help="NAME to list, or `retry NAME` to re-apply after a fix.")],
    generation: Annotated[int | None, typer.Option(help="A generation other than the active one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the events NAME parked (on_error="park"), or `retry NAME`: rebuild the parked keys with today's code."""
    settings = _settings()
    if len(words) == 2 and words[0] == "retry":
        projection = _registry(settings).get(words[1])

        async def retry(pool: Any) -> None:
            from rehydrate import catalog
            from rehydrate.store import EventStore

            store = EventStore(pool, settings.schema_name)
            async with pool.acquire() as conn:
                keys, still = await catalog.retry_dead_letters(conn, store, settings.read_model_schema, projection)
            out.print(f"{projection.name}: {keys} parked key(s) rebuilt, {still} still parked")
            if still:
                raise UserError(
                    f"{still} key(s) of {projection.name!r} failed again",
                    fix=f"see `rehydrate dead-letters {projection.name}`",
                )

        _with_pool(retry)
        return
    if len(words) != 1:
        raise UserError(
            f"unexpected arguments {' '.join(words)!r}", fix="use `dead-letters NAME` or `dead-letters retry NAME`"
        )
    name = words[0]

    async def show(pool: Any) -> None:
        from rehydrate import catalog

        async with pool.acquire() as conn:
            number = (
                generation
                if generation is not None
                else await catalog.active_generation(conn, settings.schema_name, name)
            )
            rows = await catalog.dead_letters(conn, settings.schema_name, name, number)
        if as_json:
            _print_json(rows)
            return
        out.print(f"{name} g{number}: {len(rows)} parked event(s)")
        for r in rows:
            out.print(
                f"  position {r['global_position']} {escape(r['stream_id'])}@{r['stream_version']} "
                f"{r['event_type']} key {escape(r['key'])}: {escape(r['error'])}",
                soft_wrap=True,
            )

    _with_pool(show)


# -- schedules ------------------------------------------------------------------------------------------------


@schedule_app.command("create")
def schedule_create(
    name: Annotated[str, typer.Argument(help="The schedule's name (its id in Temporal).")],
    projection: Annotated[str, typer.Option("--projection", "-p", help="The projection to rebuild.")],
    cron: Annotated[str | None, typer.Option(help="A cron expression, e.g. '0 3 * * *' (UTC).")] = None,
    every: Annotated[str | None, typer.Option(help="An interval: 6h, 30m, 1d, 1h30m.")] = None,
    lanes: Annotated[
        int | None,
        typer.Option(help="Lanes per replay (default: the worker's REHYDRATE_LANES; unset: 8 by range, 4 by hash)."),
    ] = None,
    verify_only: Annotated[
        bool, typer.Option("--verify-only", help="Verify PROJECTION (as `rehydrate verify`) instead of rebuilding it.")
    ] = False,
) -> None:
    """Rebuild (or verify) PROJECTION on a schedule; a run that finds a replay of it running is skipped, and says so."""
    from rehydrate.schedules import schedule_spec

    schedule_spec(cron, every)  # before Temporal: name the mistake itself
    settings = _settings()
    registry = _registry(settings)

    async def work() -> None:
        from rehydrate.schedules import create_schedule
        from rehydrate.temporal import connect_client

        client = await connect_client(settings)
        await create_schedule(
            client,
            settings,
            name,
            projection,
            cron=cron,
            every=every,
            lanes=lanes,
            registry=registry if len(registry) else None,
            verify_only=verify_only,
        )
        what = "verifies" if verify_only else "rebuilds"
        out.print(f"schedule {name} {what} {projection} ({f'cron {cron}' if cron else f'every {every}'})")
        out.print(f"  {settings.ui_url}/namespaces/{settings.temporal_namespace}/schedules/{name}")

    _run(work)


@schedule_app.command("list")
def schedule_list(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List rehydrate's schedules: projection, when, paused, next run."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.schedules import list_schedules
        from rehydrate.temporal import connect_client

        views = await list_schedules(await connect_client(settings))
        if as_json:
            _print_json(views)
            return
        table = Table("schedule", "projection", "does", "when", "state", "next run")
        for v in views:
            table.add_row(
                v.name,
                v.projection,
                v.kind,
                v.spec,
                "paused" if v.paused else "active",
                f"{v.next_runs[0]:%Y-%m-%d %H:%M:%S} UTC" if v.next_runs and not v.paused else "-",
            )
        out.print(table)

    _run(work)


@schedule_app.command("describe")
def schedule_describe(
    name: Annotated[str, typer.Argument(help="The schedule.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show NAME: next runs, and recent runs with their outcome (new generation or drift found, skipped, failure)."""
    settings = _settings()

    async def work() -> None:
        from rehydrate.schedules import describe_schedule
        from rehydrate.temporal import connect_client

        v = await describe_schedule(await connect_client(settings), name)
        if as_json:
            _print_json(v)
            return
        what = "verifies" if v.kind == "verify" else "rebuilds"
        out.print(f"{v.name}: {what} [bold]{v.projection}[/] {v.spec}, {'paused' if v.paused else 'active'}")
        if v.note:
            out.print(f"  note: {escape(v.note)}")
        for when in v.next_runs:
            out.print(f"  next: {when:%Y-%m-%d %H:%M:%S} UTC")
        for run in v.recent_runs:
            out.print(
                f"  {run.started_at:%Y-%m-%d %H:%M:%S} {run.status.lower()}: {escape(run.outcome)}", soft_wrap=True
            )
            out.print(f"    {settings.workflow_url(run.workflow_id, run.run_id)}")
        if v.skipped_overlap:
            out.print(f"  {v.skipped_overlap} run(s) skipped while this schedule's previous run was still going")

    _run(work)


def _schedule_command(name: str, verb: str) -> None:
    settings = _settings()

    async def work() -> None:
        from rehydrate import schedules
        from rehydrate.temporal import connect_client

        client = await connect_client(settings)
        await getattr(schedules, f"{verb}_schedule")(client, name)
        out.print(f"schedule {name}: {verb}{'d' if verb.endswith('e') else 'ed'}")

    _run(work)


@schedule_app.command("pause")
def schedule_pause(name: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Stop NAME's future runs until `unpause` (a running replay goes on)."""
    _schedule_command(name, "pause")


@schedule_app.command("unpause")
def schedule_unpause(name: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Resume NAME's runs."""
    _schedule_command(name, "unpause")


@schedule_app.command("trigger")
def schedule_trigger(name: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Run NAME's replay (or verify) now (skipped if a replay of its projection is running)."""
    _schedule_command(name, "trigger")


@schedule_app.command("delete")
def schedule_delete(name: Annotated[str, typer.Argument(help="The schedule.")]) -> None:
    """Delete NAME (a replay it started goes on to the end)."""
    _schedule_command(name, "delete")


# -- output -----------------------------------------------------------------------------------------------------


async def _watch(handle: Any, name: str) -> Any:
    from rehydrate.starter import wait_for_replay

    with Progress(
        TextColumn(f"[bold]{name}[/]"),
        TextColumn("{task.fields[phase]:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>10} ev/s"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
    ) as bar:
        task = bar.add_task(name, total=None, phase="planning", rate="")

        def show(progress: Any) -> None:
            bar.update(
                task,
                total=progress.events_total or None,
                completed=progress.events_applied,
                phase=progress.phase,
                rate=f"{progress.rate:,.0f}",
            )

        result = await wait_for_replay(handle, show)
        bar.update(
            task,
            total=max(result.events_applied - result.caught_up, 1),
            completed=result.events_applied - result.caught_up,
            phase="done",
            rate=f"{result.events_per_second:,.0f}",
        )
    return result


def _print_result(settings: Settings, result: Any, workflow_id: str, run_id: str | None) -> None:
    previous = f" (was g{result.previous_generation})" if result.previous_generation else ""
    out.print(
        f"[green]✓[/] {result.projection}: generation {result.generation} active{previous} — "
        f"{result.events_applied:,} events in {result.seconds:.1f} s ({result.events_per_second:,.0f} events/s), "
        f"{result.rows:,} rows, {result.caught_up:,} caught up, swap lock {result.swap_lock_ms:.1f} ms"
    )
    out.print(f"  {settings.workflow_url(workflow_id, run_id)}")


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=_default, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- entry point ------------------------------------------------------------------------------------------------


def _exit_code(args: list[str] | None) -> int:
    try:
        app(args=args, prog_name="rehydrate")  # standalone: usage errors print themselves and exit 2
        return 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except UserError as error:
        # escape: a message quotes user input (a stream id, a path) that may look like Rich markup.
        err.print(f"[red]error:[/] {escape(error.message)}", soft_wrap=True)
        if error.fix:
            err.print(f"  fix: {escape(error.fix)}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 130


def tune_gc() -> None:
    """Collect garbage less often. A batch of 50,000 events is ~250,000 new tracked objects (records, events,
    payload dicts), all alive until the batch is folded: every young collection that runs meanwhile walks all of
    them, and the default thresholds (700 allocations) took 40% of a replay's read. With 50,000 a batch still
    met about five (10% of a worker's CPU). A chunk of 100,000 events (two batches, and its rows kept between
    them) still met about one collection of ~50 ms per worker and replay at 500,000; at 1,000,000, none.
    Objects made at start-up are frozen out of the collector's way."""
    gc.freeze()
    gc.set_threshold(1_000_000, 20, 10)


def main(args: list[str] | None = None) -> None:
    """The console entry point: runs a command, then exits without interpreter finalisers (sdk-python#300)."""
    tune_gc()
    from rehydrate.logs import configure

    configure(json=False)
    from rehydrate.dev import quiet_exit

    code = _exit_code(args)
    from rehydrate.tracing import flush

    flush()  # os._exit below runs no exit handler: export the spans still batched
    quiet_exit(code)
