"""`rehydrate replay`: start, plan, watch, pause, resume, tune and cancel replays."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c
from rehydrate.core.errors import UserError
from rehydrate.core.limits import MAX_LANES

if TYPE_CHECKING:
    import asyncpg
    from temporalio.client import WorkflowHandle

    from rehydrate.core.settings import Settings
    from rehydrate.engine import operations
    from rehydrate.engine.projections import Registry
    from rehydrate.models import RepairResult, ReplayInput, ReplayProgress, ReplayResult
    from rehydrate.runs import ReplayRun
    from rehydrate.workflows.replay import ReplayWorkflow

app = typer.Typer(help="Start, watch, pause and cancel replays.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The projection.")]


@app.command("start")
def start(
    name: Annotated[str | None, typer.Argument(help="The projection to rebuild (or --stale).")] = None,
    lanes: Annotated[int | None, typer.Option(help=f"Key partitions applied in parallel (1-{MAX_LANES}).")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Events per chunk activity.")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Chunks running at once, over all lanes.")] = None,
    max_rate: Annotated[
        float | None, typer.Option(help="At most this many events per second over all lanes (changeable: tune).")
    ] = None,
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
    accept_partial_history: Annotated[
        bool,
        typer.Option(
            "--accept-partial-history",
            help="Kafka: build even though retention deleted the topic's start, or it is compacted (recorded).",
        ),
    ] = False,
    stale: Annotated[bool, typer.Option("--stale", help="Start one replay per STALE projection.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and wait for the swap.")] = False,
    as_json: c.Json = False,
) -> None:
    """Start a replay of NAME: build a new generation from the events, then swap it in (or build a sandbox)."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.models import ReplayInput
    from rehydrate.starter import check_replay_input, start_replay, wait_for_replay

    settings = c.settings()
    registry = c.projections(settings)
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
            max_rate=max_rate,
            sandbox=sandbox,
            to_position=to_position,
            as_of=as_of,
            allow_dead_letters=allow_dead_letters,
            accept_partial_history=accept_partial_history,
        )

    known = registry if len(registry) else None  # none here: the workers' own list decides
    if name is not None:
        check_replay_input(input_for(name), known)  # before Temporal

    async def work() -> None:
        names = [name] if name is not None else await _stale_names(settings, registry)
        if not names:
            c.print_json([]) if as_json else c.out.print("no projection is stale")
            return
        client = await connect_client(settings)
        handles = [(p, await start_replay(client, settings, input_for(p), registry=known)) for p in names]
        if not wait:
            started = [
                {"projection": p, "workflow_id": h.id, "run_id": h.result_run_id, "url": url(settings, h)}
                for p, h in handles
            ]
            if as_json:
                c.print_json(started if stale else started[0])
            for entry in [] if as_json else started:
                c.out.print(f"started the replay of {entry['projection']}: {entry['url']}")
            return
        results = []
        for projection, handle in handles:
            if as_json:
                results.append(await wait_for_replay(handle))
                continue
            c.out.print(f"replay of [bold]{projection}[/]: {url(settings, handle)}")
            print_result(settings, await watch(handle, projection), handle)
        if as_json:
            c.print_json(results if stale else results[0])

    c.run(work)


def url(settings: Settings, handle: WorkflowHandle[Any, Any]) -> str:
    return settings.workflow_url(handle.id, handle.result_run_id)


async def _stale_names(settings: Settings, registry: Registry) -> list[str]:
    from rehydrate.core.database import ready_pool, resolve_url
    from rehydrate.engine import operations
    from rehydrate.sources.pools import Sources
    from rehydrate.sources.store import EventStore

    async with (
        ready_pool(resolve_url(settings), settings.schema_name) as pool,
        Sources(EventStore(pool, settings.schema_name)) as sources,
        pool.acquire() as conn,
    ):
        return await operations.stale_projections(conn, sources, registry, settings.read_model_schema)


async def watch(handle: WorkflowHandle[ReplayWorkflow, ReplayResult], name: str) -> ReplayResult:
    """Wait for a replay with a progress bar; its result."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rehydrate.starter import wait_for_replay

    with Progress(
        TextColumn(f"[bold]{name}[/]"),
        TextColumn("{task.fields[phase]:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>10} ev/s"),
        TimeRemainingColumn(),
        console=c.out,
        transient=False,
    ) as bar:
        task = bar.add_task(name, total=None, phase="planning", rate="")

        def show(progress: ReplayProgress) -> None:
            bar.update(
                task,
                total=progress.events_total or None,
                completed=progress.events_applied,
                phase="paused" if progress.paused else progress.phase,
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


def print_result(
    settings: Settings, result: ReplayResult, handle: WorkflowHandle[Any, Any], *, link: bool = True
) -> None:
    c.out.print(f"[green]✓[/] {result.describe()}")
    if link:
        c.out.print(f"  {url(settings, handle)}")


@app.command("repair")
def repair(
    name: Name,
    key: Annotated[list[str] | None, typer.Option("--key", help="A key to repair (repeat it for more).")] = None,
    keys_from: Annotated[
        Path | None, typer.Option("--keys-from", help="A file of keys, one per line ('-': standard input).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show which keys would change; change nothing.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Keys per transaction.")] = 500,
    show: Annotated[int, typer.Option(min=0, help="Changed keys to show.")] = 10,
    as_json: c.Json = False,
) -> None:
    """Rebuild the rows of selected keys of NAME's live read model from their whole history, with the current code,
    without a replay: a batch of keys at a time, each in one transaction under the tail's lock.

    Runs as the `Repair` workflow on the workers."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.models import RepairInput
    from rehydrate.starter import repair as run_repair
    from rehydrate.workflows.messages import repair_message

    settings = c.settings()
    registry = c.projections(settings)
    keys = list(key or [])
    if keys_from is not None:
        text = sys.stdin.read() if str(keys_from) == "-" else _read_keys_file(keys_from)
        keys += [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise UserError("no key to repair", fix="give --key KEY (repeatable) or --keys-from FILE")
    asked = RepairInput(name, keys=keys, dry_run=dry_run, batch_size=batch_size, show=show)

    async def work() -> RepairResult:
        client = await connect_client(settings)
        return await run_repair(client, settings, asked, registry=registry if len(registry) else None)

    r = c.run(work)
    if as_json:
        c.print_json(r)
        return
    c.out.print(("[yellow]dry run:[/] " if dry_run else "[green]✓[/] ") + escape(repair_message(r)), soft_wrap=True)
    for drift in r.first:
        c.out.print(f"  {escape(drift.key)}: {_REPAIR_PROBLEMS.get(drift.problem, drift.problem)}")


# How a repair's changed key reads: verify's words, as what the repair does to the live row.
_REPAIR_PROBLEMS = {"missing in live": "row added", "missing in rebuild": "row removed", "differs": "row changed"}


def _read_keys_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise UserError(f"cannot read the keys file {str(path)!r}: {error.strerror}", fix="check the path") from None


@app.command("plan")
def plan(
    name: Name,
    lanes: Annotated[
        int | None,
        typer.Option(
            help="Lanes (default: REHYDRATE_LANES; unset: 8 by stream range, fewer on a small store, 4 by hash)."
        ),
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Events per chunk (default: REHYDRATE_CHUNK_SIZE).")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Chunks at once (default: REHYDRATE_MAX_PARALLEL).")] = None,
    accept_partial_history: Annotated[
        bool, typer.Option("--accept-partial-history", help="Kafka: plan even from a truncated or compacted topic.")
    ] = False,
    as_json: c.Json = False,
) -> None:
    """Show what a replay of NAME would do, changing nothing: events, lanes, chunks and an estimated duration."""
    from temporalio.service import RPCError

    from rehydrate.core.temporal import connect_client, workers_polling
    from rehydrate.engine import operations

    settings = c.settings()
    projection = c.projections(settings).get(name)

    async def work(pool: asyncpg.Pool) -> operations.ReplayPlan:
        workers: int | None = None
        try:
            client = await connect_client(settings)
            workers = await workers_polling(client, settings.temporal_task_queue)
        except (UserError, RPCError):
            workers = None  # Temporal unreachable: the estimate assumes a worker per lane
        return await operations.plan(
            pool,
            settings,
            projection,
            lanes=lanes,
            chunk_size=chunk_size,
            max_parallel=max_parallel,
            workers=workers,
            accept_partial_history=accept_partial_history,
        )

    p = c.with_pool(settings, work)
    if as_json:
        c.print_json(p)
        return
    chunks = sum(lane.chunks for lane in p.lanes)
    c.out.print(
        f"{name}: {p.events:,} events to read from source {p.source} below mark {p.mark}, {len(p.lanes)} lanes, "
        f"{chunks:,} chunks of up to {p.chunk_size:,} events, at most {p.max_parallel} at once"
    )
    for lane in p.lanes:
        c.out.print(f"  lane {lane.lane}: {lane.events:,} events, {lane.chunks:,} chunk{'s' * (lane.chunks != 1)}")
    c.out.print(
        f"  sample chunk: {p.sample_events:,} events read, folded and written in {p.sample_seconds:.3f} s "
        f"({p.events_per_second:,.0f} events/s in this process, rolled back)"
    )
    if p.measured_events_per_second is not None:
        c.out.print(
            f"  latest build (g{p.measured_generation}): {p.measured_events_per_second:,.0f} events/s over the "
            "whole build"
        )
    polling = "Temporal unreachable" if p.workers is None else f"{p.workers} polling {settings.temporal_task_queue}"
    idle = " (a replay would wait for one: `rehydrate worker`)" if p.workers == 0 else ""
    c.out.print(f"  workers: {polling}{idle}")
    if p.estimated_seconds is None:
        c.out.print("  estimated build: nothing to sample (no events)")
    elif p.estimated_from == "measured":
        c.out.print(f"  estimated build: {p.estimated_seconds:,.1f} s at the latest build's rate")
    else:
        parallel = min(len(p.lanes), p.max_parallel, p.workers or len(p.lanes))
        c.out.print(
            f"  estimated build: {p.estimated_seconds:,.1f} s at the sample's rate with {parallel} chunk(s) at once "
            "(one per worker process), plus indexes, catch-up and swap"
        )


@app.command("status")
def status(
    name: Name,
    sandbox: Annotated[str | None, typer.Option(help="The build into this sandbox instead.")] = None,
    as_json: c.Json = False,
) -> None:
    """Show NAME's running replay, else its latest, however it was started: progress, or the result or error."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.runs import started_by
    from rehydrate.starter import replay_status

    settings = c.settings()
    c.known_projection(settings, name)

    async def work() -> None:
        found = await replay_status(
            await connect_client(settings), name, sandbox, task_queue=settings.temporal_task_queue
        )
        if as_json:
            c.print_json(found)
            return
        c.out.print(f"{name}: {c.state(found.status)}")
        if found.run_id:
            by = started_by(found.workflow_id, name, settings.temporal_task_queue)
            c.out.print(f"  {found.workflow_id} (started by {by})")
            c.out.print(f"  {settings.workflow_url(found.workflow_id, found.run_id)}")
        if found.progress is not None:
            c.out.print(f"  {found.progress.summary()}")
            for lane in found.progress.lanes:
                c.out.print(
                    f"    lane {lane.lane}: position {lane.position}, {lane.applied:,}/{lane.total:,}"
                    f"{' done' if lane.done else ''}"
                )
        if found.unanswered:
            c.out.print(f"  progress unknown: {found.unanswered}")
        if found.result is not None:
            c.out.print(f"  {found.result.describe()}")
        if found.error:
            c.out.print(f"  {found.error}")

    c.run(work)


@app.command("list")
def list_runs(
    name: Name,
    limit: Annotated[int, typer.Option(help="At most this many runs, newest first.")] = 20,
    as_json: c.Json = False,
) -> None:
    """List NAME's recent replays (sandbox builds included), running first, with who started each: cli, schedule,
    verify or other (the Web UI or a program)."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.runs import replay_runs

    settings = c.settings()
    c.known_projection(settings, name)

    async def work() -> list[ReplayRun]:
        return await replay_runs(
            await connect_client(settings), name, limit=limit, task_queue=settings.temporal_task_queue
        )

    runs = c.run(work)
    if as_json:
        c.print_json(runs)
        return
    if not runs:
        c.out.print(f"{name}: no replay found in Temporal")
        return
    table = Table("status", "started", "closed", "started by", "sandbox", "workflow id", "run id")
    for run in runs:
        table.add_row(
            c.state(run.status),
            c.when(run.started_at),
            c.when(run.closed_at),
            run.started_by,
            run.sandbox or "-",
            run.workflow_id,
            run.run_id,
        )
    c.out.print(table)


@app.command("cancel")
def cancel(
    name: Annotated[str, typer.Argument(help="The projection whose replay to cancel.")],
    sandbox: Annotated[str | None, typer.Option(help="Cancel the build into this sandbox instead.")] = None,
    as_json: c.Json = False,
) -> None:
    """Cancel NAME's running replay, whoever started it: its half-built generation is dropped, the active one
    stays."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import cancel_replay

    settings = c.settings()
    c.known_projection(settings, name)

    async def work() -> str:
        return await cancel_replay(
            await connect_client(settings), name, sandbox, task_queue=settings.temporal_task_queue
        )

    workflow_id = c.run(work)
    _done(
        {"projection": name, "workflow_id": workflow_id, "requested": "cancel"}, as_json, "cancellation requested for"
    )


@app.command("pause")
def pause(
    name: Annotated[str, typer.Argument(help="The projection whose replay to pause.")], as_json: c.Json = False
) -> None:
    """Pause NAME's running replay after its running chunks (signal `pause`; the Web UI can send it too)."""
    _signal(name, "pause", as_json)


@app.command("resume")
def resume(
    name: Annotated[str, typer.Argument(help="The projection whose replay to resume.")], as_json: c.Json = False
) -> None:
    """Resume NAME's paused replay (signal `resume`)."""
    _signal(name, "resume", as_json)


def _signal(name: str, signal: str, as_json: bool) -> None:
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import signal_replay

    settings = c.settings()
    c.known_projection(settings, name)

    async def work() -> str:
        return await signal_replay(
            await connect_client(settings), name, signal, task_queue=settings.temporal_task_queue
        )

    _done({"projection": name, "workflow_id": c.run(work), "requested": signal}, as_json, f"{signal} sent to")


@app.command("tune")
def tune(
    name: Annotated[str, typer.Argument(help="The projection whose running replay to tune.")],
    max_parallel: Annotated[
        int | None, typer.Option(help="Chunks running at once, over all lanes, from the next chunk.")
    ] = None,
    max_rate: Annotated[float | None, typer.Option(help="At most this many events per second, over all lanes.")] = None,
    unthrottle: Annotated[bool, typer.Option("--unthrottle", help="Lift a --max-rate limit.")] = False,
    as_json: c.Json = False,
) -> None:
    """Change a running replay's --max-parallel or --max-rate (or lift the rate limit with --unthrottle), from its next
    chunks on: running chunks finish under the old values."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import throttle_replay, tune_replay

    if max_parallel is None and max_rate is None and not unthrottle:
        raise UserError("nothing to tune", fix="give --max-parallel N, --max-rate N or --unthrottle")
    if max_rate is not None and unthrottle:
        raise UserError("--max-rate and --unthrottle contradict each other", fix="give one of them")
    settings = c.settings()
    c.known_projection(settings, name)
    queue = settings.temporal_task_queue

    async def work() -> dict[str, Any]:
        client = await connect_client(settings)
        changed: dict[str, Any] = {"projection": name}
        if max_parallel is not None:
            changed["previous_max_parallel"] = await tune_replay(client, name, max_parallel, task_queue=queue)
            changed["max_parallel"] = max_parallel
        if max_rate is not None or unthrottle:
            changed["previous_max_rate"] = await throttle_replay(client, name, max_rate, task_queue=queue)
            changed["max_rate"] = max_rate
        return changed

    changed = c.run(work)
    if as_json:
        c.print_json(changed)
        return
    if "max_parallel" in changed:
        c.out.print(f"replay of {name}: max_parallel {changed['previous_max_parallel']} → {max_parallel}")
    if "max_rate" in changed:
        c.out.print(f"replay of {name}: max_rate {_rate(changed['previous_max_rate'])} → {_rate(max_rate)}")


def _rate(rate: float | None) -> str:
    return "no limit" if rate is None else f"{rate:,.0f} events/s"


def _done(state: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        c.print_json(state)
    else:
        c.out.print(f"{text} {state['workflow_id']}")
