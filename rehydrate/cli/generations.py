"""`rehydrate generations` and `rehydrate rollback`: a projection's builds, and going back to a retained one."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from rehydrate.cli import _common as c
from rehydrate.core.errors import UserError

if TYPE_CHECKING:
    import asyncpg

    from rehydrate.engine.operations import Rollback

app = typer.Typer()

Name = Annotated[str, typer.Argument(help="The projection.")]


@app.command("generations")
def generations(name: Name, as_json: c.Json = False) -> None:
    """List NAME's generations: state, version, fingerprint, counts, timings and the run that built each."""
    from rehydrate.engine.catalog import Catalog

    settings = c.settings()
    c.known_projection(settings, name)

    async def work(pool: asyncpg.Pool) -> list[dict[str, Any]]:
        async with pool.acquire() as conn:
            return await Catalog(conn, settings.schema_name).generations(name)

    rows = c.with_pool(settings, work)
    if not rows:
        raise UserError(f"projection {name!r} has no generations", fix=f"build one: `rehydrate replay start {name}`")
    if as_json:
        c.print_json(rows)
        return
    children = any(len(r["tables"]) > 1 for r in rows)  # a projection with child tables: name each build's tables
    table = Table("gen", "state", "version", "fingerprint", "events", "rows", "parked", "built in", "started", "run")
    if children:
        table.add_column("tables")
    for r in rows:
        tables = [", ".join(r["tables"])] if children else []
        table.add_row(
            f"g{r['generation']}",
            r["state"],
            str(r["version"]),
            r["fingerprint"],
            f"{r['events_applied']:,}",
            f"{r['rows_count']:,}" if r["rows_count"] is not None else "-",
            str(r["dead_letters"]),
            f"{r['build_seconds']:.1f} s" if r["build_seconds"] is not None else "-",
            c.when(r["started_at"]),
            f"{r['workflow_id']} {r['run_id'] or ''}".strip(),
            *tables,
        )
    c.out.print(table)


@app.command("rollback")
def rollback_command(
    name: Name,
    to: Annotated[int | None, typer.Option("--to", help="The retained generation (default: the previous one).")] = None,
    as_json: c.Json = False,
) -> None:
    """Swap NAME's previous retained generation back in at once, then catch it up from its own checkpoint."""
    from rehydrate.engine.operations import rollback

    settings = c.settings()
    projection = c.projections(settings).get(name)

    async def work(pool: asyncpg.Pool) -> Rollback:
        return await rollback(pool, settings, projection, to)

    done = c.with_pool(settings, work)
    if as_json:
        c.print_json(dataclasses.asdict(done))
        return
    c.out.print(
        f"{name}: generation {done.to_generation} active again (was g{done.from_generation}), "
        f"{done.caught_up:,} events caught up from its checkpoint"
    )
    if done.fingerprint_differs:
        c.out.print(
            f"  note: g{done.to_generation} was built from other projection code than this process has; "
            "the tail applies new events with the workers' code"
        )
