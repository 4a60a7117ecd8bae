"""`rehydrate db`: rehydrate's schema, the grants of a least-privilege worker role, and the database's URL and psql."""

from __future__ import annotations

import subprocess
from typing import Annotated

import asyncpg
import typer

from rehydrate.cli import _common as c
from rehydrate.core import embedded
from rehydrate.core.database import connect, ensure_schema, grant, grants_sql, resolve_url
from rehydrate.core.identifiers import check_identifier
from rehydrate.core.settings import redact_url

app = typer.Typer(help="The database: rehydrate's schema, its workers' grants, its URL and psql.", no_args_is_help=True)


@app.command("init")
def init(as_json: c.Json = False) -> None:
    """Create or update rehydrate's schema and tables (idempotent)."""
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
    apply: Annotated[bool, typer.Option("--apply", help="Run the statements instead of printing them.")] = False,
    as_json: c.Json = False,
) -> None:
    """The least privileges a worker's role needs: print them (or, with --apply, grant them as the owner)."""
    settings = c.settings()
    statements = grants_sql(settings.schema_name, settings.read_model_schema, check_identifier(role, "role"))
    if not apply:
        if as_json:
            c.print_json({"role": role, "statements": statements, "applied": False})
        else:
            c.out.print(";\n".join(statements) + ";", soft_wrap=True)
        return
    count = c.with_pool(
        settings,
        lambda pool: _grant(pool, settings.schema_name, settings.read_model_schema, role),
    )
    if as_json:
        c.print_json({"role": role, "statements": statements, "applied": True})
    else:
        c.out.print(f"granted role {role!r} what a rehydrate worker needs ({count} statements)")


async def _grant(pool: asyncpg.Pool, schema: str, read_schema: str, role: str) -> int:
    async with pool.acquire() as conn:
        return await grant(conn, schema, read_schema, role)


@app.command("url")
def url(
    show_password: Annotated[bool, typer.Option("--show-password", help="Print the password too.")] = False,
    as_json: c.Json = False,
) -> None:
    """Print the database's URL: REHYDRATE_DATABASE_URL, or the running embedded Postgres's."""
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
    settings = c.settings()
    target = resolve_url(settings)
    done = subprocess.run([str(embedded.psql()), target, *(["-c", command] if command else [])], check=False)
    if done.returncode:
        raise typer.Exit(done.returncode)
