"""`rehydrate dead-letters`: the events a projection parked (on_error="park"), and rebuilding their keys after a fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from rehydrate.cli import _common as c
from rehydrate.cli._deprecated import DefaultToList
from rehydrate.core.errors import UserError

if TYPE_CHECKING:
    import asyncpg

app = typer.Typer(
    cls=DefaultToList,
    help='Events a projection could not apply (on_error="park"): list them, rebuild their keys after a fix.',
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(help="The projection.")]


@app.command("list")
def list_dead_letters(
    name: Name,
    generation: Annotated[int | None, typer.Option(help="A generation other than the active one.")] = None,
    as_json: c.Json = False,
) -> None:
    """List the events NAME parked: the active generation's, or else the latest generation that parked any."""
    from rehydrate.engine.catalog import Catalog

    settings = c.settings()
    c.known_projection(settings, name)

    async def work(pool: asyncpg.Pool) -> tuple[int, list[dict[str, Any]]]:
        async with pool.acquire() as conn:
            catalog = Catalog(conn, settings.schema_name)
            number = generation
            if number is None:
                number = await catalog.active_generation_or_none(name)
            if number is None:
                # A replay that parked events and was not swapped in (or failed): its generation holds them.
                number = await catalog.latest_generation_with_dead_letters(name)
            if number is None:
                raise UserError(
                    f"projection {name!r} has no active generation and no parked events",
                    fix=f"check the name, or build one: `rehydrate replay start {name}`",
                )
            return number, await catalog.dead_letters(name, number)

    number, rows = c.with_pool(settings, work)
    if as_json:
        c.print_json(rows)
        return
    c.out.print(f"{name} g{number}: {len(rows)} parked event(s)")
    for r in rows:
        c.out.print(
            f"  position {r['global_position']} {escape(r['stream_id'])}@{r['stream_version']} "
            f"{r['event_type']} key {escape(r['key'])}: {escape(r['error'])}",
            soft_wrap=True,
        )


@app.command("retry")
def retry(name: Name, as_json: c.Json = False) -> None:
    """Rebuild NAME's parked keys from their whole history with today's code; exit 1 if some fail again."""
    from rehydrate.engine.generations import Generations
    from rehydrate.sources.pools import Sources
    from rehydrate.sources.store import EventStore

    settings = c.settings()
    projection = c.projections(settings).get(name)

    async def work(pool: asyncpg.Pool) -> tuple[int, int]:
        async with Sources(EventStore(pool, settings.schema_name)) as sources, pool.acquire() as conn:
            return await Generations(conn, sources, settings.read_model_schema).retry_dead_letters(projection)

    keys, still = c.with_pool(settings, work)
    if as_json:
        c.print_json({"projection": name, "keys_retried": keys, "keys_still_parked": still})
    else:
        c.out.print(f"{projection.name}: {keys} parked key(s) rebuilt, {still} still parked")
    if still:
        raise UserError(
            f"{still} key(s) of {projection.name!r} failed again",
            fix=f"see `rehydrate dead-letters list {projection.name}`",
        )
