"""`rehydrate sources check` and `prepare`: whether a mapping fits its live table, and the column and index that make
a table transaction-ordered (as exact as rehydrate's own store). Every statement on a source's catalog entries and
every DDL rehydrate may run on a source's table is here."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from rehydrate.core.errors import SourceUnavailable, UserError
from rehydrate.core.identifiers import derived_name, quote
from rehydrate.sources.events import Event, UndecodablePayload
from rehydrate.sources.log import LogSource
from rehydrate.sources.mapping import EventTable, sql_of
from rehydrate.sources.reading import EventSource

_COLUMN_DEFAULT = """SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
    JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = to_regclass($1) AND a.attname = $2"""
# The tables whose column `$3` a view `$1.$2` reads (its transaction column's defaults live there).
_VIEW_TABLES = """SELECT DISTINCT format('%I.%I', table_schema, table_name) FROM information_schema.view_column_usage
    WHERE view_schema = $1 AND view_name = $2 AND column_name = $3 ORDER BY 1"""
# Whether a column is filled from a sequence: an identity column, or a nextval() default (serial, bigserial).
_FROM_SEQUENCE = """SELECT a.attidentity <> '' OR coalesce(pg_get_expr(d.adbin, d.adrelid), '') LIKE 'nextval(%'
    FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = to_regclass($1) AND a.attname = $2"""
_RELKIND = "SELECT relkind FROM pg_class WHERE oid = to_regclass($1)"
# Whether an index leads with column $2 of table $1.
_INDEX_LEADS_WITH = """SELECT EXISTS (SELECT 1 FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass($1) AND a.attname = $2)"""
_FUNCTIONS = """SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = $1 AND p.proname LIKE $2"""
_EXPLAIN = "EXPLAIN (FORMAT JSON) SELECT 1 FROM {events} WHERE {order} IS NOT NULL ORDER BY {order} LIMIT 1000"
# With scans and sorts priced out, the plan uses an index whenever one can serve the order, however small the table.
_PREFER_INDEXES = "SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off"
_ADD_TRANSACTION = "ALTER TABLE {events} ADD COLUMN IF NOT EXISTS {column} xid8 NOT NULL DEFAULT pg_current_xact_id()"
_INDEX_TRANSACTION = "CREATE INDEX IF NOT EXISTS {index} ON {events} ({column}, {pos})"
_NOTIFY_FUNCTION = """CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$"""
_NOTIFY_TRIGGER = """CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {events}
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{function}()"""

_GRANT_SCHEMA = "GRANT USAGE ON SCHEMA {schema} TO {role}"
_GRANT_SELECT = "GRANT SELECT ON {events} TO {role}"

SAMPLE_ROWS = 200


@dataclass
class SourceCheck:
    """What `sources check` found: problems (exit 1), warnings (worth a look), and what holds."""

    source: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


SAMPLE_MESSAGES = 20


async def check_log(log: LogSource) -> SourceCheck:
    """Check a log source: the brokers (or the stream's endpoint) answer, its partitions or shards and what each holds,
    a decoded sample (types read, values decoded) and the history guard (a rebuild needs the whole history)."""
    found = SourceCheck(log.name)
    try:
        ranges = await log.ranges()
    except (UserError, SourceUnavailable) as error:
        found.problems.append(str(error))
        return found
    if any(r.name is not None for r in ranges):
        names = {r.partition: r.name for r in ranges}
        shown = [
            f"{r.name} ({'closed' if r.closed else 'open'}"
            + (f", after {' and '.join(str(names.get(p)) for p in r.parents)}" if r.parents else "")
            + ")"
            for r in ranges[:16]
        ]
        found.holds.append(
            f"{len(ranges)} shard(s), {sum(not r.closed for r in ranges)} open: "
            + ", ".join(shown)
            + (" …" if len(ranges) > 16 else "")
        )
    else:
        held = sum((r.end or 0) - r.earliest for r in ranges)
        found.holds.append(
            f"{len(ranges)} partition(s), {held:,} offset(s) held: "
            + ", ".join(f"{r.partition}: {r.earliest}..{r.end}" for r in ranges[:16])
            + (" …" if len(ranges) > 16 else "")
        )
    try:
        _, problems = await log.check_history(accept_partial=True)
    except SourceUnavailable as error:
        problems = [f"its history could not be checked: {error}"]
    if problems:
        found.problems += [f"{p} — a replay refuses it unless started with --accept-partial-history" for p in problems]
    else:
        found.holds.append(f"it holds its whole history: {log.holds_whole_history}")
    sample: list[Event] = []
    async with log.reader() as reader:
        for r in ranges:
            if len(sample) >= SAMPLE_MESSAGES:
                break
            read = await reader.read_range(r.partition, r.earliest, r.end, SAMPLE_MESSAGES - len(sample), name=r.name)
            sample += read.events
    if not sample:
        found.warnings.append(f"the {log.noun} holds no message yet: nothing to decode")
        return found
    unread = [e.data for e in sample if isinstance(e.data, UndecodablePayload)]
    undecodable = [e for e in sample if isinstance(e.data, UndecodablePayload) and e.data.part == "value"]
    untyped = [e for e in sample if not e.type]
    keyless = [e for e in sample if not e.stream_id]
    bad_keys = [data for data in unread if data.part == "key" and "no key" not in data.problem]
    if undecodable:
        first = undecodable[0].data
        assert isinstance(first, UndecodablePayload)
        found.problems.append(f"{len(undecodable)} of {len(sample)} sampled values undecodable: {first.problem}")
    if untyped:
        found.problems.append(
            f"{len(untyped)} of {len(sample)} sampled messages have no event type (neither the type header nor the "
            "type field): map type_header or type_field"
        )
    if keyless:
        found.problems.append(
            f"{len(keyless)} of {len(sample)} sampled messages have no key: without their stream id as the key, a "
            "stream's messages are spread over partitions and lose their order; such messages are parked (or stop "
            "the replay)"
        )
    if bad_keys:
        found.problems.append(
            f"{len(bad_keys)} of {len(sample)} sampled keys cannot be stream ids: {bad_keys[0].problem}"
        )
    if not unread:
        types = sorted({e.type for e in sample})
        found.holds.append(f"{len(sample)} sampled messages decode, of type(s) {', '.join(types[:8])}")
    return found


async def check_source(conn: asyncpg.Connection, source: EventSource) -> SourceCheck:
    """Validate a mapping against the live table: columns, the read order's index, a decoded sample, stream
    versions rising, and the gap strategy. `conn` connects to the source's database."""
    found = SourceCheck(source.name)
    mapping = source.mapping
    try:
        await source.inspect(conn)
    except UserError as error:
        found.problems.append(f"{error.message} — {error.fix}")
        return found
    found.holds.append(f"{mapping.table}: every mapped column exists")
    await _check_position(conn, source, found)
    await _check_order_index(conn, source, found)
    await _check_sample(conn, source, found)
    await _check_gaps(conn, source, found)
    return found


async def _check_position(conn: asyncpg.Connection, source: EventSource, found: SourceCheck) -> None:
    """A table's position column should be filled from a sequence: else (an outbox with a column its writers fill
    as they please, or none at all) there is no order to replay in."""
    position = source.mapping.position
    if not source.is_table or not isinstance(position, str):
        return
    if await conn.fetchval(_FROM_SEQUENCE, source.table, position):
        found.holds.append(f"position {position!r} is filled from a sequence")
        return
    found.warnings.append(
        f"position {position!r} is filled from no sequence (no identity, no nextval default): rehydrate replays in its "
        "order, which is then only as good as the writers make it; an outbox needs a rising order column, e.g. "
        f"ALTER TABLE {source.table} ADD COLUMN rehydrate_position bigint GENERATED ALWAYS AS IDENTITY"
    )


async def _check_order_index(conn: asyncpg.Connection, source: EventSource, found: SourceCheck) -> None:
    mapping = source.mapping
    position = sql_of(mapping.position)
    order = position
    if mapping.order == "transaction" and mapping.transaction is not None:
        order = sql_of(mapping.transaction)
    async with conn.transaction():
        await conn.execute(_PREFER_INDEXES)
        plan = await conn.fetchval(_EXPLAIN.format(events=source.table, order=order))
    if "Index" in str(plan):
        found.holds.append(f"an index serves the read order ({order})")
        return
    index = quote(derived_name(mapping.name, "_rehydrate_order_idx"))
    columns = order if order == position else f"{order}, {position}"
    found.warnings.append(
        f"no index serves the read order ({order}): every chunk would scan the table; "
        f"run CREATE INDEX {index} ON {source.table} ({columns})"
    )


async def _check_sample(conn: asyncpg.Connection, source: EventSource, found: SourceCheck) -> None:
    events = await source.latest(conn, SAMPLE_ROWS)
    undecodable = [e for e in events if type(e.data) is UndecodablePayload]
    if undecodable:
        first = undecodable[0]
        found.problems.append(
            f"{len(undecodable)} of the latest {len(events)} payloads do not decode, e.g. event "
            f"{first.global_position}: {first.data.problem}"  # type: ignore[attr-defined]
        )
    elif events:
        found.holds.append(f"the latest {len(events)} payloads decode")
    last: dict[str, int] = {}
    for event in events:
        before = last.get(event.stream_id)
        if before is not None and event.stream_version <= before:
            found.problems.append(
                f"stream {event.stream_id!r}: version {event.stream_version} comes after version {before} in position "
                "order: the stream_version column does not rise with the position"
            )
            break
        last[event.stream_id] = event.stream_version
    else:
        if events:
            found.holds.append("stream versions rise with the position in the sample")


async def _check_gaps(conn: asyncpg.Connection, source: EventSource, found: SourceCheck) -> None:
    mapping = source.mapping
    if mapping.order == "transaction":
        assert mapping.transaction is not None
        column = mapping.transaction if isinstance(mapping.transaction, str) else None
        tables = [source.table]
        if column is not None and not source.is_table:
            tables = [row[0] for row in await conn.fetch(_VIEW_TABLES, mapping.schema, mapping.name, column)]
            if not tables:
                found.warnings.append(
                    f"view {mapping.table!r}: its column {column!r} could not be traced to its tables; each must fill "
                    "it with DEFAULT pg_current_xact_id()"
                )
                return
        for table in tables:
            default = None if column is None else await conn.fetchval(_COLUMN_DEFAULT, table, column)
            if default is None or "pg_current_xact_id" not in str(default):
                found.problems.append(
                    f"transaction column {column!r} of {table} has no DEFAULT pg_current_xact_id(): rows may carry "
                    f"no transaction id; run `rehydrate sources prepare {source.name}`"
                )
                return
        found.holds.append("gap-safe: each row carries its transaction id (as exact as rehydrate's own store)")
    elif mapping.order == "gap_free":
        functions = await conn.fetch(_FUNCTIONS, mapping.schema, "es_insert_events_%")
        if functions:
            found.warnings.append(
                f"py-eventsourcing's insert function {functions[0][0]!r} exists: an application that inserts through "
                "it (POSTGRES_ENABLE_DB_FUNCTIONS) does not lock the table, and positions may then commit out of "
                f"order; run `rehydrate sources prepare {source.name}` and map order='transaction'"
            )
        found.holds.append(
            "declared gap-free: positions are given in commit order by the writers (not something a check can prove)"
        )
    else:
        found.warnings.append(
            f"settle window of {mapping.settle_seconds:g} s: an event that commits later than that lands below a "
            f"checkpoint and is applied late, by the gap audit (for {mapping.gap_horizon_seconds:g} s); run "
            f"`rehydrate sources prepare {source.name}` for an exact order"
        )
        at = mapping.recorded_at
        if source.is_table and isinstance(at, str) and not await conn.fetchval(_INDEX_LEADS_WITH, source.table, at):
            index = quote(derived_name(mapping.name, f"_{at}_idx"))
            found.warnings.append(
                f"no index leads with {at!r}: every mark of the settle window (each tail poll) scans the table; run "
                f"CREATE INDEX {index} ON {source.table} ({quote(at)})"
            )


def prepare_sql(mapping: EventTable, *, column: str = "rehydrate_tx", notify: bool = False) -> list[str]:
    """The statements that make `mapping`'s table transaction-ordered: a column filled with each row's transaction id
    (existing rows get the ALTER's own, which commits before any later write) and its index; with `notify`, a trigger
    that wakes tails at each insert."""
    events, pos = mapping.relation, sql_of(mapping.position)
    statements = [
        _ADD_TRANSACTION.format(events=events, column=quote(column)),
        _INDEX_TRANSACTION.format(
            index=quote(derived_name(mapping.name, f"_{column}_idx")), events=events, column=quote(column), pos=pos
        ),
    ]
    if notify:
        channel = mapping.channel  # a checked identifier: safe inside the function's string literal
        function = quote(derived_name(mapping.name, "_rehydrate_notify"))
        statements += [
            _NOTIFY_FUNCTION.format(schema=quote(mapping.schema), function=function, channel=channel),
            _NOTIFY_TRIGGER.format(
                trigger=quote(derived_name(mapping.name, "_rehydrate_notify")),
                events=events,
                schema=quote(mapping.schema),
                function=function,
            ),
        ]
    return statements


def grants_sql(mapping: EventTable, role: str) -> list[str]:
    """What a worker's role needs on a source's database: to read its table, nothing more."""
    who = quote(role)
    return [
        _GRANT_SCHEMA.format(schema=quote(mapping.schema), role=who),
        _GRANT_SELECT.format(events=mapping.relation, role=who),
    ]


async def prepare(conn: asyncpg.Connection, statements: list[str], mapping: EventTable | None = None) -> None:
    """Run `prepare_sql`'s statements in one transaction (refused on a view: its tables are what to prepare)."""
    if mapping is not None and await conn.fetchval(_RELKIND, mapping.relation) in (b"v", "v"):
        raise UserError(
            f"{mapping.table!r} is a view: a column cannot be added to it",
            fix="prepare each table under it (print the statements with --print-sql and name the tables), then "
            "map the view's transaction column",
        )
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
