"""`rehydrate sources`: the event tables projections read, whether a mapping fits its table, and making a table
transaction-ordered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from rehydrate.cli import _common as c
from rehydrate.core.errors import SourceUnavailable, UserError

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.core.settings import Settings
    from rehydrate.sources.declaration import AnySource, Source
    from rehydrate.sources.inspection import SourceCheck
    from rehydrate.sources.reading import EventSource

app = typer.Typer(help="Event sources: list them, check a mapping, prepare a table.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The source.")]


def declared(settings: Settings) -> dict[str, AnySource]:
    """The project's sources: those its projections read (declared in code or settings), and those in settings."""
    from rehydrate.sources.declaration import sources_from_settings

    found = {source.name: source for source in c.projections(settings).sources()}
    return {**sources_from_settings(settings.sources), **found}


def named(settings: Settings, name: str) -> AnySource:
    sources = declared(settings)
    if name not in sources:
        raise UserError(
            f"unknown source {name!r} (declared: {', '.join(sorted(sources)) or 'none'})",
            fix="declare it beside the projections that read it, or as [sources.NAME] in rehydrate.toml",
        )
    return sources[name]


def named_table(settings: Settings, name: str, doing: str) -> Source:
    """The table source `name`; a UserError for a Kafka or Kinesis source, naming what it cannot do."""
    from rehydrate.sources.declaration import KafkaSource, KinesisSource

    source = named(settings, name)
    if isinstance(source, KafkaSource):
        raise UserError(f"source {name!r} is a Kafka topic: {doing} is for event tables", fix="name a table source")
    if isinstance(source, KinesisSource):
        raise UserError(f"source {name!r} is a Kinesis stream: {doing} is for event tables", fix="name a table source")
    return source


@contextlib.asynccontextmanager
async def connected(settings: Settings, source: Source) -> AsyncIterator[tuple[asyncpg.Pool, EventSource]]:
    """A pool on the source's database, and its reader."""
    from rehydrate.core.database import create_pool, ready_pool, resolve_url
    from rehydrate.sources.reading import EventSource

    url = source.database_url
    if url is None:
        async with ready_pool(resolve_url(settings), settings.schema_name) as pool:
            yield pool, EventSource(pool, source.table, source.name)
        return
    pool = await create_pool(url, max_size=2)
    try:
        yield pool, EventSource(pool, source.table, source.name, external=True)
    finally:
        await pool.close()


@app.command("list")
def list_sources(as_json: c.Json = False) -> None:
    """List the sources: table, gap strategy, database, and the projections that read each."""
    from rehydrate.core.settings import redact_url
    from rehydrate.sources.declaration import KafkaSource, KinesisSource

    settings = c.settings()
    registry = c.projections(settings)
    rows: list[dict[str, Any]] = []
    readers: dict[str, list[str]] = {}
    for projection in registry:
        name = projection.event_source.name if projection.event_source is not None else "rehydrate"
        readers.setdefault(name, []).append(projection.name)
    rows.append(
        {
            "name": "rehydrate",
            "table": f"{settings.schema_name}.events",
            "order": "transaction",
            "database": "read models",
            "projections": readers.get("rehydrate", []),
        }
    )
    for name, source in sorted(declared(settings).items()):
        if isinstance(source, KafkaSource):
            rows.append(
                {
                    "name": name,
                    "table": f"kafka topic {source.topic.topic}",
                    "order": "partition",
                    "database": source.bootstrap_servers or "(from the environment)",
                    "projections": readers.get(name, []),
                }
            )
            continue
        if isinstance(source, KinesisSource):
            rows.append(
                {
                    "name": name,
                    "table": f"kinesis stream {source.stream.stream}",
                    "order": "shard",
                    "database": source.endpoint_url or source.region or "(from the environment)",
                    "projections": readers.get(name, []),
                }
            )
            continue
        url = source.database_url
        rows.append(
            {
                "name": name,
                "table": source.table.table,
                "order": source.table.order,
                "database": "read models" if url is None else redact_url(url),
                "projections": readers.get(name, []),
            }
        )
    if as_json:
        c.print_json(rows)
        return
    table = Table("source", "table", "order", "database", "projections")
    for row in rows:
        table.add_row(row["name"], row["table"], row["order"], row["database"], ", ".join(row["projections"]) or "-")
    c.out.print(table)


@app.command("check")
def check(name: Name, as_json: c.Json = False) -> None:
    """Check NAME's mapping against its live table: columns, the index of the read order, decoded payloads, rising
    stream versions and the gap strategy; or a Kafka topic: partitions, offsets, a decoded sample and whether it holds
    its whole history; or a Kinesis stream: shards (open or closed, and their parents), a decoded sample and whether
    it may have lost records to retention. Exit 1 on a problem."""
    from rehydrate.sources.declaration import KafkaSource, KinesisSource
    from rehydrate.sources.inspection import SourceCheck, check_log, check_source
    from rehydrate.sources.pools import open_log

    settings = c.settings()
    source = named(settings, name)

    async def work() -> SourceCheck:
        if isinstance(source, KafkaSource | KinesisSource):
            try:
                log = await open_log(source)
            except SourceUnavailable as error:
                return SourceCheck(source.name, problems=[str(error)])
            except UserError as error:  # a stream that does not exist, no region or no credentials
                return SourceCheck(source.name, problems=[str(error)])
            try:
                return await check_log(log)
            finally:
                await log.close()
        async with connected(settings, source) as (pool, reader), pool.acquire() as conn:
            return await check_source(conn, reader)

    found = c.run(work)
    if as_json:
        c.print_json({**vars(found), "ok": found.ok})
    else:
        for line in found.holds:
            c.out.print(f"[green]✓[/] {escape(line)}", soft_wrap=True)
        for line in found.warnings:
            c.out.print(f"[yellow]![/] {escape(line)}", soft_wrap=True)
        for line in found.problems:
            c.out.print(f"[red]✗[/] {escape(line)}", soft_wrap=True)
    if not found.ok:
        raise UserError(f"source {name!r} has {len(found.problems)} problem(s)", fix="see the lines marked ✗ above")


@app.command("prepare")
def prepare_command(
    name: Name,
    print_sql: Annotated[bool, typer.Option("--print-sql", help="Print the statements (for a DBA) instead.")] = False,
    notify: Annotated[bool, typer.Option("--notify", help="Also a trigger that wakes tails at each insert.")] = False,
    column: Annotated[str, typer.Option(help="The transaction column's name.")] = "rehydrate_tx",
    as_json: c.Json = False,
) -> None:
    """Give NAME's table a transaction column (xid8, DEFAULT pg_current_xact_id()) and its index, so that it can be
    read as exactly as rehydrate's own store (map it with order="transaction", transaction=COLUMN)."""
    from rehydrate.sources.inspection import prepare, prepare_sql

    settings = c.settings()
    source = named_table(settings, name, "prepare")
    statements = prepare_sql(source.table, column=column, notify=notify)
    if not print_sql:

        async def work() -> None:
            async with connected(settings, source) as (pool, _), pool.acquire() as conn:
                await prepare(conn, statements, source.table)

        c.run(work)
    if as_json:
        c.print_json({"source": name, "statements": statements, "applied": not print_sql})
    elif print_sql:
        c.out.print(";\n".join(statements) + ";", soft_wrap=True)
    else:
        c.out.print(f"source {name}: {source.table.table} has transaction column {column!r} and its index")
    if notify and source.table.notify_channel is None and not as_json:
        c.err.print(
            f"note: tails poll {name} until its mapping names the channel: notify_channel = {source.table.channel!r}",
            soft_wrap=True,
        )
