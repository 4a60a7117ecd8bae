"""`rehydrate events`: load events into the store, and check every stored (type, version) can be read."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.engine.event_check import TypeVersion
    from rehydrate.engine.importer import ImportReport

app = typer.Typer(help="Load events into the event store, and check them against the code.", no_args_is_help=True)


@app.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="A JSON Lines file: one {stream_id, type, data, …} a line.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Events per COPY batch.")] = 20_000,
    as_json: c.Json = False,
) -> None:
    """Import events from a JSON Lines file through COPY, all or nothing."""
    from rehydrate.engine.importer import import_events, read_jsonl
    from rehydrate.sources.store import EventStore

    settings = c.settings()

    async def work(pool: asyncpg.Pool) -> ImportReport:
        store = EventStore(pool, settings.schema_name)
        return await import_events(store, read_jsonl(file), source=str(file), batch_size=batch_size)

    report = c.with_pool(settings, work)
    if as_json:
        c.print_json({**dataclasses.asdict(report), "events_per_second": report.events_per_second})
        return
    c.out.print(
        f"imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s)"
    )


@app.command("check")
def check(as_json: c.Json = False) -> None:
    """List every (event type, schema version) in the store; exit 1 if one has no upcaster path or no handler."""
    from rehydrate.engine.event_check import check_events
    from rehydrate.sources.store import EventStore

    settings = c.settings()
    registry = c.projections(settings)
    aggregates = c.aggregates(settings)

    async def work(pool: asyncpg.Pool) -> list[TypeVersion]:
        return await check_events(EventStore(pool, settings.schema_name), registry, aggregates)

    report = c.with_pool(settings, work)
    problems = [row for row in report if not row.ok]
    if as_json:
        c.print_json([{**dataclasses.asdict(row), "ok": row.ok} for row in report])
    else:
        table = Table("event type", "version", "events", "handled by", "problem")
        for row in report:
            problem = "; ".join(row.problems)
            table.add_row(
                escape(row.event_type),
                f"v{row.schema_version}",
                f"{row.events:,}",
                escape(", ".join(row.handled_by)) or "-",
                f"[red]{escape(problem)}[/]" if problem else "ok",
            )
        c.out.print(table)
        for row in problems:  # in full, below the table, which a narrow terminal truncates
            for problem in row.problems:
                c.out.print(
                    f"[red]{escape(row.event_type)} v{row.schema_version}[/]: {escape(problem)}", soft_wrap=True
                )
        c.out.print(
            f"{len(problems)} of {len(report)} (type, version) pairs have a problem"
            if problems
            else f"all {len(report)} (type, version) pairs can be read"
        )
    if problems:
        raise typer.Exit(1)
