"""Connections to Postgres: the configured URL or the embedded server, and the idempotent schema set-up."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any
from urllib.parse import unquote

import asyncpg
import orjson

from rehydrate.core import embedded
from rehydrate.core.errors import DatabaseUnreachable, UserError
from rehydrate.core.identifiers import check_identifier, quote
from rehydrate.core.settings import Settings, redact_url, url_password

log = logging.getLogger("rehydrate")

# Any fixed 64-bit number: serialises concurrent schema set-ups across processes.
_SCHEMA_LOCK = 0x7265687964726174

# The database-wide statements; the tables' own are with their owners (sources.store, engine.catalog,
# engine.readmodels, engine.snapshots), and the schema is sql/schema.sql.
_SCHEMA_TAG = "SELECT obj_description(to_regnamespace($1), 'pg_namespace')"
_LOCK_SCHEMA_SETUP = "SELECT pg_advisory_xact_lock($1)"
_TAG_SCHEMA = "COMMENT ON SCHEMA {schema} IS '{tag}'"
_CURRENT_USER = "SELECT current_user"
_ROLE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)"
_GRANT_SCHEMA = "GRANT USAGE ON SCHEMA {schema} TO {role}"
_GRANT_EVENTS = "GRANT SELECT ON {schema}.events TO {role}"
_GRANT_CONTROL_TABLE = "GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.{table} TO {role}"
_GRANT_READ_MODELS = "GRANT USAGE, CREATE ON SCHEMA {read_schema} TO {role}"


def sql_text(name: str) -> str:
    """A statement or script from the package's `sql/` folder."""
    return files("rehydrate").joinpath("sql", name).read_text(encoding="utf-8")


def resolve_url(settings: Settings, *, start: bool = False) -> str:
    """The database: REHYDRATE_DATABASE_URL, or the embedded Postgres of the data dir when it runs. With `start`
    (only `rehydrate dev`, `demo` and `worker` pass it), the embedded Postgres is started when it does not run."""
    if settings.database_url:
        return settings.database_url
    url = embedded.running_url(settings.data_dir)
    if url is not None:
        return url
    if start:
        return embedded.start(settings.data_dir)
    raise embedded.not_running(settings.data_dir)


def _encode_jsonb(value: object) -> bytes:
    return b"\x01" + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> object:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON travels in binary (COPY needs it) and is parsed by orjson, several times faster than `json`.
    # jsonb's binary form is a version byte (1) followed by the JSON text.
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=_decode_jsonb, format="binary"
    )
    await conn.set_type_codec("json", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads, format="binary")


def _unreachable(url: str, error: Exception) -> UserError:
    """One line for a database that cannot be reached, or a URL that cannot be parsed; the password is shown
    neither in the URL nor in the driver's message."""
    if isinstance(error, (ValueError, OverflowError)):
        # The parser's message quotes pieces of the URL (an unescaped `/` in the password makes the rest of
        # it "the port"): none of it is shown.
        return UserError(
            f"cannot connect to Postgres at {redact_url(url)}: the URL is not valid",
            fix="check REHYDRATE_DATABASE_URL: postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with special "
            "characters in the password percent-encoded",
        )
    detail = str(error)
    password = url_password(url)
    if password:
        detail = detail.replace(password, "***").replace(unquote(password), "***")
    message = f"cannot connect to Postgres at {redact_url(url)}: {detail}"
    if isinstance(error, (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)):
        fix = "Postgres is up but refused the login: check the user and password in REHYDRATE_DATABASE_URL"
    elif isinstance(error, asyncpg.InvalidCatalogNameError):
        fix = "Postgres is up but has no such database: create it (createdb NAME) or fix its name in the URL"
    else:
        fix = "start Postgres or set REHYDRATE_DATABASE_URL to a reachable database"
        return DatabaseUnreachable(message, fix=fix)
    return UserError(message, fix=fix)


def worker_session(settings: Settings) -> dict[str, Any]:
    """What a worker's connections ask of Postgres so that a worker gone silent (frozen, or cut off by the network
    with no FIN or RST ever arriving) does not hold its locks for ever: a lane's row lock blocks the chunk's retry,
    and a swap's view lock blocks every reader. As `create_pool`'s keywords.

    - `idle_in_transaction_session_timeout` ends a session left idle inside its transaction: the state of a worker
      cut off between two statements (the server answered; the next command never comes). It must stay above the
      longest healthy pause between two statements of a transaction (a fold of one fetch of events in Python, a
      read from another database or a topic): REHYDRATE_DB_IDLE_IN_TRANSACTION_TIMEOUT, 60 s by default.
    - TCP keepalives and `tcp_user_timeout` end a session whose peer stopped answering at the network level, idle
      or not: a backend blocked sending rows to a lost worker, or waiting for the rest of a statement's exchange
      (asyncpg's bind after its prepare, a COPY's rows), is stopped by nothing else: `statement_timeout` interrupts
      neither, and the session does not count as idle. A live worker's kernel answers probes and
      acknowledges data however busy its process is, so these never cut a slow worker: REHYDRATE_DB_PEER_TIMEOUT,
      60 s (keepalives from 30 s of silence, then 3 probes 10 s apart). (Linux also ends a connection whose peer
      has kept its window shut, not reading at all, that long: a worker's event loop is never blocked for 60 s.)
    - No `statement_timeout` and no `command_timeout`: a healthy statement (an index on a large table, the merge of
      a large chunk) has no useful bound, and a lost worker's statement is ended by the rules above; the worker's
      side of it is cancelled by Temporal when its heartbeats stop (see activities._common).

    Settings of 0 leave Postgres's and asyncpg's defaults. Sessions over a Unix socket ignore the TCP settings."""
    server: dict[str, str] = {}
    if settings.db_idle_in_transaction_timeout > 0:
        server["idle_in_transaction_session_timeout"] = f"{round(settings.db_idle_in_transaction_timeout * 1000)}ms"
    options: dict[str, Any] = {}
    peer = settings.db_peer_timeout
    if peer > 0:
        server["tcp_keepalives_idle"] = str(max(1, round(peer / 2)))
        server["tcp_keepalives_interval"] = str(max(1, round(peer / 6)))
        server["tcp_keepalives_count"] = "3"
        server["tcp_user_timeout"] = f"{round(peer * 1000)}ms"
        options["timeout"] = peer  # asyncpg's connect timeout: a server that never answers the handshake
    return {"server_settings": server, **options} if server else options


# Every session rehydrate opens prints dates in ISO 8601, whatever the server's or the database's DateStyle: the bulk
# reads take each event's recorded_at as text (see sources.reading). Sent at connect, so that a pool's RESET ALL
# keeps it. Only the output format is set; the order in which ambiguous input dates are read stays the server's.
SESSION = {"DateStyle": "ISO"}


def _with_session(connect: dict[str, Any]) -> dict[str, Any]:
    return {**connect, "server_settings": {**SESSION, **connect.get("server_settings", {})}}


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10, **connect: Any) -> asyncpg.Pool:
    """A pool whose connections decode JSON with orjson and print dates in ISO 8601; an unreachable database is one
    clear line. `connect`: more of asyncpg's connection keywords (a worker's: `worker_session`)."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            command_timeout=None,
            **_with_session(connect),
        )
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError, OverflowError) as error:
        raise _unreachable(url, error) from None
    assert pool is not None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    try:
        conn = await asyncpg.connect(url, server_settings=SESSION)
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError, OverflowError) as error:
        raise _unreachable(url, error) from None
    await _init_connection(conn)
    return conn


def _schema_script(schema: str) -> tuple[str, str]:
    """The schema script for `schema`, and the tag that marks a schema made by exactly that script."""
    script = sql_text("schema.sql").format(schema=quote(check_identifier(schema, "schema name")))
    return script, "rehydrate schema " + hashlib.sha256(script.encode()).hexdigest()[:16]


async def ensure_schema(conn: Any, schema: str) -> None:
    """Create or update rehydrate's schema and tables; safe to run from many processes at once.

    The script's digest is kept as the schema's comment: when it matches, nothing is run, so a worker whose
    role may not change the schema (docs/deployment.md, a least-privilege role) starts fine once an owner has run
    `rehydrate db init` with the same version of rehydrate.
    """
    script, tag = _schema_script(schema)
    if await conn.fetchval(_SCHEMA_TAG, schema) == tag:
        return
    try:
        async with conn.transaction():
            await conn.execute(_LOCK_SCHEMA_SETUP, _SCHEMA_LOCK)
            if await conn.fetchval(_SCHEMA_TAG, schema) == tag:
                return
            await conn.execute(script)
            await conn.execute(_TAG_SCHEMA.format(schema=quote(schema), tag=tag))
    except asyncpg.InsufficientPrivilegeError as error:
        user = await conn.fetchval(_CURRENT_USER)
        raise UserError(
            f"schema {schema!r} is missing or was made by another version of rehydrate, and role {user!r} may "
            f"not change it ({error})",
            fix="run `rehydrate db init` once as the schema's owner, with this version of rehydrate",
        ) from None


async def role_exists(conn: asyncpg.Connection, role: str) -> bool:
    return bool(await conn.fetchval(_ROLE_EXISTS, role))


async def grant(conn: asyncpg.Connection, statements: list[str], role: str) -> int:
    """Run grant `statements` (`grants_sql`'s, a source's) for `role` in one transaction; returns how many ran."""
    if not await role_exists(conn, role):
        raise UserError(f"role {role!r} does not exist", fix=f"create it first: CREATE ROLE {role} LOGIN")
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
    return len(statements)


def grants_sql(schema: str, read_schema: str, role: str) -> list[str]:
    """The privileges a worker's role needs, and no more: read the events, keep the control tables, and own
    the read models' tables and views in `read_schema` (it creates, replaces and drops them)."""
    s = quote(check_identifier(schema, "schema name"))
    r = quote(check_identifier(read_schema, "read-model schema name"))
    who = quote(check_identifier(role, "role"))
    return [
        _GRANT_SCHEMA.format(schema=s, role=who),
        _GRANT_EVENTS.format(schema=s, role=who),
        *(_GRANT_CONTROL_TABLE.format(schema=s, table=quote(table), role=who) for table in control_tables()),
        _GRANT_READ_MODELS.format(read_schema=r, role=who),
    ]


def control_tables() -> list[str]:
    """The tables of schema.sql other than the events (those the worker writes)."""
    names = re.findall(r"CREATE TABLE IF NOT EXISTS \{schema\}\.(\w+)", sql_text("schema.sql"))
    return [name for name in names if name != "events"]


@asynccontextmanager
async def ready_pool(url: str, schema: str, *, max_size: int = 10) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database whose rehydrate schema exists (created on first use); closed on exit."""
    pool = await create_pool(url, max_size=max_size)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, schema)
        yield pool
    finally:
        await pool.close()
