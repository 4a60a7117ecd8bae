"""`rehydrate sandbox`: list and drop sandbox builds (point-in-time and verify rebuilds that never go live)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from rehydrate.cli import _common as c
from rehydrate.cli._deprecated import notice

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.core.settings import Settings

app = typer.Typer(help="Sandbox builds: point-in-time and verify rebuilds that never go live.", no_args_is_help=True)
legacy = typer.Typer()


@app.command("list")
def list_sandboxes(as_json: c.Json = False) -> None:
    """List sandbox builds: label, schema, projection, state, cut-off, rows."""
    _list(c.settings(), as_json)


@legacy.command("sandboxes", hidden=True)
def sandboxes(as_json: c.Json = False) -> None:
    """Deprecated: `rehydrate sandbox list`."""
    notice("sandboxes", "sandbox list")
    _list(c.settings(), as_json)


def _list(settings: Settings, as_json: bool) -> None:
    from rehydrate.engine.catalog import Catalog
    from rehydrate.engine.readmodels import sandbox_schema

    async def work(pool: asyncpg.Pool) -> list[dict[str, Any]]:
        async with pool.acquire() as conn:
            return await Catalog(conn, settings.schema_name).sandboxes()

    rows = c.with_pool(settings, work)
    if as_json:
        c.print_json([{**row, "schema": sandbox_schema(row["label"])} for row in rows])
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
            sandbox_schema(r["label"]),
            r["projection"],
            f"g{r['generation']}",
            r["state"],
            cutoff,
            f"{r['rows_count']:,}" if r["rows_count"] is not None else "-",
        )
    c.out.print(table)


@app.command("drop")
def drop(label: Annotated[str, typer.Argument(help="The sandbox label.")], as_json: c.Json = False) -> None:
    """Drop sandbox LABEL: its schema and every build in it."""
    from rehydrate.engine.generations import Generations
    from rehydrate.engine.readmodels import sandbox_schema
    from rehydrate.sources.store import EventStore

    settings = c.settings()

    async def work(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn:
            generations = Generations(conn, EventStore(pool, settings.schema_name), settings.read_model_schema)
            return await generations.drop_sandbox(label)

    builds = c.with_pool(settings, work)
    if as_json:
        c.print_json({"sandbox": label, "schema": sandbox_schema(label), "builds_dropped": builds})
    else:
        c.out.print(f"sandbox {label} dropped ({builds} build(s), schema {sandbox_schema(label)})")
