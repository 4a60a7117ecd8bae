"""`rehydrate snapshots`: rewrite every snapshot of an aggregate type, watch and cancel the rebuild."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    from rehydrate.models import SnapshotRebuildProgress

app = typer.Typer(help="Bulk rebuilds of aggregate snapshots.", no_args_is_help=True)

AggregateType = Annotated[str, typer.Argument(help="The aggregate type.")]


@app.command("rebuild")
def rebuild(
    aggregate_type: Annotated[str, typer.Argument(help="The aggregate type whose snapshots to rewrite.")],
    partitions: Annotated[int, typer.Option(help="Hash partitions of its streams, done in parallel.")] = 4,
    chunk_size: Annotated[int, typer.Option(help="Streams per chunk activity.")] = 500,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and wait for the end.")] = False,
    as_json: c.Json = False,
) -> None:
    """Rewrite the snapshot of every stream of AGGREGATE_TYPE (after its code changed), as a Temporal workflow."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rehydrate.core.temporal import connect_client
    from rehydrate.models import SnapshotRebuildInput
    from rehydrate.starter import start_snapshot_rebuild, wait_for_snapshot_rebuild

    settings = c.settings()
    aggregates = c.aggregates(settings)

    async def work() -> None:
        client = await connect_client(settings)
        input = SnapshotRebuildInput(aggregate_type, partitions=partitions, chunk_size=chunk_size)
        # Without REHYDRATE_AGGREGATES here, the workers' own list decides (the plan names an unknown type).
        handle = await start_snapshot_rebuild(
            client, settings, input, aggregates=aggregates if len(aggregates) else None
        )
        url = settings.workflow_url(handle.id, handle.result_run_id)
        if not wait:
            if as_json:
                c.print_json({"workflow_id": handle.id, "run_id": handle.result_run_id, "url": url})
            else:
                c.out.print(f"started the snapshot rebuild of {aggregate_type}: {url}")
            return
        if as_json:
            c.print_json(await wait_for_snapshot_rebuild(handle))
            return
        c.out.print(f"snapshot rebuild of [bold]{aggregate_type}[/]: {url}")
        with Progress(
            TextColumn(f"[bold]{aggregate_type}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10} streams/s"),
            TimeRemainingColumn(),
            console=c.out,
        ) as bar:
            task = bar.add_task(aggregate_type, total=None, rate="")

            def show(progress: SnapshotRebuildProgress) -> None:
                bar.update(
                    task,
                    total=progress.streams_total or None,
                    completed=progress.streams_done,
                    rate=f"{progress.rate:,.0f}",
                )

            result = await wait_for_snapshot_rebuild(handle, show)
        c.out.print(
            f"[green]✓[/] {result.streams:,} snapshots of {aggregate_type} in {result.seconds:.1f} s "
            f"({result.streams_per_second:,.0f} streams/s)"
        )

    c.run(work)


@app.command("status")
def status(aggregate_type: AggregateType, as_json: c.Json = False) -> None:
    """Show the state of AGGREGATE_TYPE's latest snapshot rebuild and its progress while it runs."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import snapshot_rebuild_status

    settings = c.settings()

    async def work() -> tuple[str, SnapshotRebuildProgress | None]:
        return await snapshot_rebuild_status(
            await connect_client(settings), aggregate_type, settings.temporal_task_queue
        )

    state, progress = c.run(work)
    if as_json:
        c.print_json({"status": state, "progress": progress})
        return
    c.out.print(f"{aggregate_type}: {c.state(state)}")
    if progress is not None:
        c.out.print(f"  {progress.streams_done:,} of {progress.streams_total:,} streams ({progress.rate:,.0f}/s)")


@app.command("cancel")
def cancel(aggregate_type: AggregateType, as_json: c.Json = False) -> None:
    """Cancel AGGREGATE_TYPE's running snapshot rebuild; the snapshots written so far stay."""
    from rehydrate.core.temporal import connect_client
    from rehydrate.starter import cancel_snapshot_rebuild

    settings = c.settings()

    async def work() -> str:
        return await cancel_snapshot_rebuild(
            await connect_client(settings), aggregate_type, settings.temporal_task_queue
        )

    workflow_id = c.run(work)
    if as_json:
        c.print_json({"aggregate_type": aggregate_type, "workflow_id": workflow_id, "requested": "cancel"})
    else:
        c.out.print(f"cancellation requested for {workflow_id}")
