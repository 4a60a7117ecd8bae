"""`rehydrate events`: load events into the store, and check every stored (type, version) can be read."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.engine.event_check import TypeVersion
    from rehydrate.engine.importer import ImportProgress, ImportReport, JsonLines

app = typer.Typer(help="Load events into the event store, and check them against the code.", no_args_is_help=True)


@app.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="A JSON Lines file: one {stream_id, type, data, …} a line.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Events per COPY batch.")] = 20_000,
    as_json: c.Json = False,
) -> None:
    """Import events from a JSON Lines file through COPY, all or nothing. On a terminal a progress bar shows the
    file read so far, the events per second and the time left."""
    from rehydrate.engine.importer import import_events, read_jsonl
    from rehydrate.sources.store import EventStore

    settings = c.settings()

    async def work(pool: asyncpg.Pool) -> ImportReport:
        store = EventStore(pool, settings.schema_name)
        lines = read_jsonl(file)
        with _progress_bar(lines, show=not as_json and c.out.is_terminal) as progress:
            return await import_events(store, lines, source=str(file), batch_size=batch_size, progress=progress)

    report = c.with_pool(settings, work)
    if as_json:
        c.print_json({**dataclasses.asdict(report), "events_per_second": report.events_per_second})
        return
    c.out.print(
        f"imported {report.events:,} events in {report.streams:,} streams in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s)"
    )


@contextlib.contextmanager
def _progress_bar(lines: JsonLines, *, show: bool) -> Iterator[Callable[[ImportProgress], None] | None]:
    """A bar of the file read so far, with the events per second and the time left (from the bytes read, which
    the events follow closely); gone when the import ends, for its one-line report. None when not `show`."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[events]:>11} events"),
        TextColumn("{task.fields[rate]:>9} ev/s"),
        TimeRemainingColumn(),
        console=c.out,
        transient=True,
    ) as bar:
        task = bar.add_task("importing", total=lines.size or None, events="0", rate="")

        def show_progress(progress: ImportProgress) -> None:
            seconds = time.perf_counter() - started
            bar.update(
                task,
                description="indexing" if progress.indexing else "importing",
                completed=lines.bytes_read,
                events=f"{progress.events:,}",
                rate=f"{progress.events / seconds:,.0f}" if seconds > 0 else "",
            )

        yield show_progress


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
