"""`rehydrate db`: rehydrate's schema, the grants of a least-privilege worker role, and the database's URL and psql."""

from __future__ import annotations

import subprocess
from typing import Annotated

import typer

from rehydrate.cli import _common as c
from rehydrate.cli import sources
from rehydrate.core.identifiers import check_identifier

app = typer.Typer(help="The database: rehydrate's schema, its workers' grants, its URL and psql.", no_args_is_help=True)


@app.command("init")
def init(as_json: c.Json = False) -> None:
    """Create or update rehydrate's schema and tables (idempotent)."""
    from rehydrate.core.database import connect, ensure_schema, resolve_url
    from rehydrate.core.settings import redact_url

    settings = c.settings()

    async def work() -> str:
        url = resolve_url(settings)
        conn = await connect(url)
        try:
            await ensure_schema(conn, settings.schema_name)
        finally:
            await conn.close()
        return redact_url(url)

    url = c.run(work)
    if as_json:
        c.print_json({"schema": settings.schema_name, "database": url, "ready": True})
    else:
        c.out.print(f"schema {settings.schema_name!r} is ready in {url}")


@app.command("grants")
def grants(
    role: Annotated[str, typer.Argument(help="The (existing) role the workers log in as.")],
    source: Annotated[
        str | None,
        typer.Option("--source", help="The grants on that event source's database instead: SELECT on its table."),
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Run the statements instead of printing them.")] = False,
    as_json: c.Json = False,
) -> None:
    """The least privileges a worker's role needs: print them (or, with --apply, grant them as the owner). On the
    read models' database that includes reading the sources it holds; a source in another database: --source NAME."""
    from rehydrate.core.database import grant, grants_sql, ready_pool, resolve_url
    from rehydrate.sources.declaration import Source
    from rehydrate.sources.inspection import grants_sql as source_grants_sql

    settings = c.settings()
    check_identifier(role, "role")
    if source is not None:
        found = sources.named_table(settings, source, "db grants --source")
        statements = source_grants_sql(found.table, role)
    else:
        statements = grants_sql(settings.schema_name, settings.read_model_schema, role)
        for declared in sources.declared(settings).values():
            if isinstance(declared, Source) and declared.database_url is None:
                statements += source_grants_sql(declared.table, role)
    if not apply:
        if as_json:
            c.print_json({"role": role, "statements": statements, "applied": False})
        else:
            c.out.print(";\n".join(statements) + ";", soft_wrap=True)
        return

    async def work() -> int:
        if source is not None:
            async with sources.connected(settings, found) as (pool, _), pool.acquire() as conn:
                return await grant(conn, statements, role)
        async with ready_pool(resolve_url(settings), settings.schema_name) as pool, pool.acquire() as conn:
            return await grant(conn, statements, role)

    count = c.run(work)
    if as_json:
        c.print_json({"role": role, "statements": statements, "applied": True})
    else:
        where = f" on source {source}'s database" if source else ""
        c.out.print(f"granted role {role!r} what a rehydrate worker needs{where} ({count} statements)")


@app.command("url")
def url(
    show_password: Annotated[bool, typer.Option("--show-password", help="Print the password too.")] = False,
    as_json: c.Json = False,
) -> None:
    """Print the database's URL: REHYDRATE_DATABASE_URL, or the running embedded Postgres's."""
    from rehydrate.core.database import resolve_url
    from rehydrate.core.settings import redact_url

    settings = c.settings()
    found = resolve_url(settings)
    shown = found if show_password else redact_url(found)
    if as_json:
        c.print_json({"url": shown, "embedded": not settings.database_url})
    else:
        c.out.print(shown, soft_wrap=True)


@app.command("psql")
def psql(
    command: Annotated[str | None, typer.Option("--command", "-c", help="Run one command and exit.")] = None,
) -> None:
    """Open psql on the database (the psql that comes with rehydrate's embedded Postgres): the read models are
    views named like their tables, e.g. `SELECT * FROM order_summary LIMIT 5;`."""
    from rehydrate.core import embedded
    from rehydrate.core.database import resolve_url

    settings = c.settings()
    target = resolve_url(settings)
    done = subprocess.run([str(embedded.psql()), target, *(["-c", command] if command else [])], check=False)
    if done.returncode:
        raise typer.Exit(done.returncode)
