"""Bulk import of events from JSON Lines through binary COPY, in one transaction.

A malformed line stops the import with its line number; because the whole file is one transaction, nothing
of it is written and it can be fixed and imported again without duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from rehydrate.errors import UserError
from rehydrate.store import EventStore, has_nul

_COPY_COLUMNS = [
    "stream_id",
    "stream_version",
    "event_type",
    "schema_version",
    "payload",
    "metadata",
    "recorded_at",
]
_FIELDS = {"stream_id", "type", "data", "stream_version", "schema_version", "metadata", "recorded_at"}


@dataclass(frozen=True)
class ImportReport:
    events: int
    streams: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) for each non-blank line; a line that is not JSON stops with its number."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}", fix="check the file's path") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error})", fix="fix or remove that line") from None


def _bad(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}", fix="fix that line and import the file again (nothing was written)")


def _record(where: Callable[[], str], line: Any) -> tuple[str, Any, tuple[Any, ...]]:
    """(stream id, the line's `stream_version` or None, the row without its version); `where` names the line."""
    if not isinstance(line, dict):
        raise _bad(where(), f"expected a JSON object, got {type(line).__name__}")
    unknown = line.keys() - _FIELDS
    if unknown:
        raise _bad(where(), f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    stream_id, event_type, data = line.get("stream_id"), line.get("type"), line.get("data")
    if not isinstance(stream_id, str) or not stream_id:
        raise _bad(where(), "'stream_id' must be a non-empty string")
    if not isinstance(event_type, str) or not event_type:
        raise _bad(where(), "'type' must be a non-empty string")
    if not isinstance(data, dict):
        raise _bad(where(), f"'data' must be a JSON object, got {type(data).__name__}")
    schema_version = line.get("schema_version", 1)
    if type(schema_version) is not int or schema_version < 1:
        raise _bad(where(), f"'schema_version' must be a positive integer, got {schema_version!r}")
    metadata = line.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _bad(where(), f"'metadata' must be a JSON object, got {type(metadata).__name__}")
    recorded = line.get("recorded_at")
    if recorded is None:
        recorded_at = datetime.now(UTC)
    else:
        try:
            recorded_at = datetime.fromisoformat(str(recorded))
        except ValueError:
            raise _bad(where(), f"'recorded_at' {recorded!r} is not an ISO 8601 timestamp") from None
        if recorded_at.tzinfo is None:
            recorded_at = recorded_at.replace(tzinfo=UTC)
    if "\x00" in stream_id or "\x00" in event_type or has_nul(data) or has_nul(metadata):
        raise _bad(where(), "contains a NUL character, which Postgres cannot store in text or JSON")
    return (
        stream_id,
        line.get("stream_version"),
        (stream_id, 0, event_type, schema_version, data, metadata, recorded_at),
    )


Parsed = list[tuple[int, tuple[str, Any, tuple[Any, ...]]]]  # (line number, _record's result)


async def import_events(
    store: EventStore,
    lines: Iterable[tuple[int, Any]],
    *,
    source: str = "input",
    batch_size: int = 20_000,
) -> ImportReport:
    """Append every line's event; versions continue each stream unless a line gives `stream_version`,
    which must then be exactly the next one.

    A pipeline of two stages: a thread reads and checks the next batch while Postgres takes the previous one
    (its COPY and index updates run in the server, so the thread has the interpreter to itself then).
    """
    started = time.perf_counter()
    items = iter(lines)
    known: dict[str, int] = {}
    total = 0

    def next_batch() -> Parsed:
        batch: Parsed = []
        for number, line in itertools.islice(items, batch_size):
            batch.append((number, _record(lambda number=number: f"{source}:{number}", line)))  # type: ignore[misc]
        return batch

    async with store.pool.acquire() as conn, conn.transaction():
        copying: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await asyncio.to_thread(next_batch)
                if copying is not None:
                    await copying
                    copying = None
                if not batch:
                    break
                records = await _number(conn, store, batch, known, source)
                copying = asyncio.create_task(_copy(conn, store, records, source))
                total += len(records)
        finally:
            if copying is not None:
                # A bad line while a batch was being written: let the COPY end before the rollback.
                with contextlib.suppress(Exception):
                    await copying
        await conn.execute("SELECT pg_notify($1, '')", store.channel)
    return ImportReport(total, len(known), time.perf_counter() - started)


async def _number(
    conn: asyncpg.Connection, store: EventStore, batch: Parsed, known: dict[str, int], source: str
) -> list[tuple[Any, ...]]:
    """Give each event its stream's next version (the stored versions of new streams are looked up)."""
    new_streams = sorted({stream_id for _, (stream_id, _, _) in batch} - known.keys())
    if new_streams:
        rows = await conn.fetch(
            f"""SELECT stream_id, max(stream_version) FROM {store.table}
                WHERE stream_id = ANY($1::text[]) GROUP BY stream_id""",
            new_streams,
        )
        known.update({s: 0 for s in new_streams})
        known.update({row[0]: row[1] for row in rows})
    records = []
    for number, (stream_id, given, record) in batch:
        version = known[stream_id] + 1
        if given is not None and given != version:
            raise _bad(
                f"{source}:{number}",
                f"'stream_version' {given!r} of stream {stream_id!r} is not the next version ({version})",
            )
        known[stream_id] = version
        records.append((stream_id, version, *record[2:]))
    return records


async def _copy(conn: asyncpg.Connection, store: EventStore, records: list[tuple[Any, ...]], source: str) -> None:
    try:
        await conn.copy_records_to_table("events", schema_name=store.schema, columns=_COPY_COLUMNS, records=records)
    except asyncpg.UniqueViolationError as error:
        raise UserError(
            f"{source}: a stream was appended to by someone else during the import ({error.detail})",
            fix="import again (nothing was written)",
        ) from None
