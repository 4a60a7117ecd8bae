"""`rehydrate schedule`: periodic rebuilds (or verifies) of a projection on Temporal Schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    from rehydrate.schedules import ScheduleView

app = typer.Typer(help="Periodic rebuilds and verifies on Temporal Schedules.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The schedule.")]


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The schedule's name (its id in Temporal).")],
    projection: Annotated[str, typer.Option("--projection", "-p", help="The projection to rebuild.")],
    cron: Annotated[str | None, typer.Option(help="A cron expression, e.g. '0 3 * * *' (UTC).")] = None,
    every: Annotated[str | None, typer.Option(help="An interval: 6h, 30m, 1d, 1h30m.")] = None,
    lanes: Annotated[
        int | None,
        typer.Option(
            help="Lanes per replay (default: the worker's REHYDRATE_LANES; unset: 8 by range, fewer on a small store, "
            "4 by hash)."
        ),
    ] = None,
    verify_only: Annotated[
        bool, typer.Option("--verify-only", help="Verify PROJECTION (as `rehydrate verify`) instead of rebuilding it.")
    ] = False,
    as_json: c.Json = False,
) -> None:
    """Rebuild (or verify) PROJECTION on a schedule; a run that finds a replay of it running is skipped, and says so."""
    from rehydrate import schedules
    from rehydrate.core.temporal import connect_client

    schedules.schedule_spec(cron, every)  # before Temporal: name the mistake itself
    settings = c.settings()
    registry = c.projections(settings)

    async def work() -> None:
        client = await connect_client(settings)
        await schedules.create_schedule(
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

    c.run(work)
    url = f"{settings.ui_url}/namespaces/{settings.temporal_namespace}/schedules/{name}"
    if as_json:
        c.print_json(
            {
                "schedule": name,
                "projection": projection,
                "does": "verify" if verify_only else "replay",
                "when": f"cron {cron}" if cron else f"every {every}",
                "url": url,
            }
        )
        return
    what = "verifies" if verify_only else "rebuilds"
    c.out.print(f"schedule {name} {what} {projection} ({f'cron {cron}' if cron else f'every {every}'})")
    c.out.print(f"  {url}")


@app.command("list")
def list_schedules(as_json: c.Json = False) -> None:
    """List rehydrate's schedules: projection, when, paused, next run."""
    from rehydrate import schedules
    from rehydrate.core.temporal import connect_client

    settings = c.settings()

    async def work() -> list[ScheduleView]:
        return await schedules.list_schedules(await connect_client(settings))

    views = c.run(work)
    if as_json:
        c.print_json(views)
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
    c.out.print(table)


@app.command("describe")
def describe(name: Name, as_json: c.Json = False) -> None:
    """Show NAME: next runs, and recent runs with their outcome (new generation or drift found, skipped, failure)."""
    from rehydrate import schedules
    from rehydrate.core.temporal import connect_client

    settings = c.settings()

    async def work() -> ScheduleView:
        return await schedules.describe_schedule(await connect_client(settings), name)

    v = c.run(work)
    if as_json:
        c.print_json(v)
        return
    what = "verifies" if v.kind == "verify" else "rebuilds"
    c.out.print(f"{v.name}: {what} [bold]{v.projection}[/] {v.spec}, {'paused' if v.paused else 'active'}")
    if v.note:
        c.out.print(f"  note: {escape(v.note)}")
    for moment in v.next_runs:
        c.out.print(f"  next: {moment:%Y-%m-%d %H:%M:%S} UTC")
    for run in v.recent_runs:
        line = f"  {run.started_at:%Y-%m-%d %H:%M:%S} {c.state(run.status)}: {escape(run.outcome)}"
        c.out.print(line, soft_wrap=True)
        c.out.print(f"    {settings.workflow_url(run.workflow_id, run.run_id)}")
    if v.skipped_overlap:
        c.out.print(f"  {v.skipped_overlap} run(s) skipped while this schedule's previous run was still going")


@app.command("pause")
def pause(name: Name, as_json: c.Json = False) -> None:
    """Stop NAME's future runs until `unpause` (a running replay goes on)."""
    _change(name, "pause", "paused", as_json)


@app.command("unpause")
def unpause(name: Name, as_json: c.Json = False) -> None:
    """Resume NAME's runs."""
    _change(name, "unpause", "unpaused", as_json)


@app.command("trigger")
def trigger(name: Name, as_json: c.Json = False) -> None:
    """Run NAME's replay (or verify) now (skipped if a replay of its projection is running)."""
    _change(name, "trigger", "triggered", as_json)


@app.command("delete")
def delete(name: Name, as_json: c.Json = False) -> None:
    """Delete NAME (a replay it started goes on to the end)."""
    _change(name, "delete", "deleted", as_json)


def _change(name: str, verb: str, done: str, as_json: bool) -> None:
    from rehydrate import schedules
    from rehydrate.core.temporal import connect_client

    change = {
        "pause": schedules.pause_schedule,
        "unpause": schedules.unpause_schedule,
        "trigger": schedules.trigger_schedule,
        "delete": schedules.delete_schedule,
    }[verb]
    settings = c.settings()

    async def work() -> None:
        await change(await connect_client(settings), name)

    c.run(work)
    if as_json:
        c.print_json({"schedule": name, "state": done})
    else:
        c.out.print(f"schedule {name}: {done}")
