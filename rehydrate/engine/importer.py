"""Bulk import of events from JSON Lines through COPY, in one transaction (into an empty store, the readers' indexes
are built after the load).

A malformed line stops the import with its line number; because the whole file is one transaction, nothing
of it is written and it can be fixed and imported again without duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from rehydrate.core.errors import UserError
from rehydrate.sources.events import has_nul
from rehydrate.sources.store import EventStore

_MAX_INT = 2**31 - 1  # schema_version is an integer column
READ_BUFFER = 4 << 20
# How often the interpreter passes between the thread that parses and the one that feeds COPY, while an import runs.
SWITCH_INTERVAL = 0.0005
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
        # Big reads: the thread that parses gives the interpreter up at each read and waits to have it back, and
        # the batches it hands over come later (1M events: COPY waited 3.3-3.9 s for them at 8 KiB, 1.8-2.2 at 4 MiB).
        handle = path.open("rb", buffering=READ_BUFFER)
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


# An ISO 8601 timestamp with an offset, in the forms Postgres' timestamptz input reads too.
_PLAIN_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:\d{2})?)\Z")
_COPY_SPECIALS = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _text(value: str) -> str:
    """A value for COPY's text format: backslash, tab, newline and carriage return escaped."""
    if value.isprintable() and "\\" not in value:  # the usual value, found without the regex
        return value
    if _COPY_SPECIALS.search(value) is None:
        return value
    return _COPY_SPECIALS.sub(lambda m: _COPY_ESCAPES[m.group()], value)


def _json(where: Callable[[], str], value: dict[str, Any]) -> str:
    """A JSON object for COPY's text format. JSON text has no raw tab or newline: only backslashes are escaped."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError as error:
        raise _bad(where(), f"cannot be written as JSON: {error}") from None
    if "\\u0000" in text and has_nul(value):
        raise _bad(where(), "contains a NUL character, which Postgres cannot store in text or JSON")
    return text.replace("\\", "\\\\")


def _record(where: Callable[[], str], line: Any, now: str) -> tuple[str, Any, str]:
    """(stream id, the line's `stream_version` or None, the rest of its COPY line after the version);
    `where` names the line, `now` is the time of events that carry none."""
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
    if schema_version > _MAX_INT:
        raise _bad(where(), f"'schema_version' {schema_version} is too big (at most {_MAX_INT})")
    metadata = line.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _bad(where(), f"'metadata' must be a JSON object, got {type(metadata).__name__}")
    recorded = line.get("recorded_at")
    if recorded is None:
        recorded_at = now
    else:
        try:
            moment = datetime.fromisoformat(str(recorded))
        except ValueError:
            raise _bad(where(), f"'recorded_at' {recorded!r} is not an ISO 8601 timestamp") from None
        if moment.tzinfo is not None and isinstance(recorded, str) and _PLAIN_TIMESTAMP.match(recorded):
            recorded_at = recorded  # valid, and in a form Postgres reads as is (isoformat() would cost 1.7 µs)
        else:
            recorded_at = (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).isoformat()
    if "\x00" in stream_id or "\x00" in event_type:
        raise _bad(where(), "contains a NUL character, which Postgres cannot store in text or JSON")
    meta = _json(where, metadata) if metadata else "{}"
    rest = f"\t{_text(event_type)}\t{schema_version}\t{_json(where, data)}\t{meta}\t{recorded_at}\n"
    return stream_id, line.get("stream_version"), rest


Parsed = list[tuple[int, tuple[str, Any, str]]]  # (line number, _record's result)


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
        now = datetime.now(UTC).isoformat()
        batch: Parsed = []
        for number, line in itertools.islice(items, batch_size):
            batch.append((number, _record(lambda number=number: f"{source}:{number}", line, now)))  # type: ignore[misc]
        return batch

    def next_data() -> tuple[int, bytes]:
        """Into an empty store: the next batch parsed, numbered and encoded, all in the thread."""
        batch = next_batch()
        return len(batch), _numbered(batch, known, source)

    with _switching_often():
        async with store.pool.acquire() as conn:
            # Looked at before the transaction: a read in it would hold a share lock until the commit, and two
            # imports into an empty store would each wait for the other's to take the exclusive one (a deadlock).
            looks_empty = await store.is_empty(conn)
            async with conn.transaction():
                deferred = await store.defer_indexes(conn) if looks_empty else []
                # Into an empty store every stream starts at version 1: nothing to look up (a stream appended to
                # meanwhile by someone else is caught by the unique (stream, version) index, and nothing is written), so
                # the thread numbers the events too, while Postgres takes the batch before.
                empty = bool(deferred) or await store.is_empty(conn)
                copying: asyncio.Task[None] | None = None
                try:
                    while True:
                        if empty:
                            size, data = await asyncio.to_thread(next_data)
                        else:
                            batch = await asyncio.to_thread(next_batch)
                            size = len(batch)
                        if copying is not None:
                            await copying
                            copying = None
                        if not size:
                            break
                        if not empty:
                            await _look_up_versions(conn, store, batch, known)
                            data = _numbered(batch, known, source)
                        copying = asyncio.create_task(_copy(conn, store, data, source))
                        total += size
                finally:
                    if copying is not None:
                        # A bad line while a batch was being written: let the COPY end before the rollback.
                        with contextlib.suppress(Exception):
                            await copying
                await store.restore_indexes(conn, deferred)
                await store.notify(conn)
    return ImportReport(total, len(known), time.perf_counter() - started)


_importing = 0  # imports running in this process
_switch_interval = 0.0  # the interpreter's switch interval before the first of them


@contextlib.contextmanager
def _switching_often() -> Iterator[None]:
    """While imports run, hand the interpreter from thread to thread every 0.5 ms instead of 5. The thread that
    parses holds it while the event loop's thread waits to feed COPY the next 200 KiB (a socket's buffer), about
    5 ms of work for Postgres: at 5 ms a hand-over Postgres sat idle half the time (87-96k events/s into an empty
    store, 103-113k at 0.5 ms, alternating runs of `rehydrate events import` on 1M events)."""
    global _importing, _switch_interval
    if _importing == 0:
        _switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(_switch_interval, SWITCH_INTERVAL))
    _importing += 1
    try:
        yield
    finally:
        _importing -= 1
        if _importing == 0:
            sys.setswitchinterval(_switch_interval)


async def _look_up_versions(conn: asyncpg.Connection, store: EventStore, batch: Parsed, known: dict[str, int]) -> None:
    """Add the stored versions of the batch's streams not met before to `known` (0: a new stream)."""
    new_streams = sorted({stream_id for _, (stream_id, _, _) in batch} - known.keys())
    if new_streams:
        known.update({s: 0 for s in new_streams})
        known.update(await store.versions(conn, new_streams))


def _numbered(batch: Parsed, known: dict[str, int], source: str) -> bytes:
    """The batch's COPY data, each event with its stream's next version (`known`: each stream's last version,
    none: a new stream)."""
    lines = []
    for number, (stream_id, given, rest) in batch:
        version = known.get(stream_id, 0) + 1
        if given is not None and given != version:
            raise _bad(
                f"{source}:{number}",
                f"'stream_version' {given!r} of stream {stream_id!r} is not the next version ({version})",
            )
        known[stream_id] = version
        lines.append(f"{_text(stream_id)}\t{version}{rest}")
    try:
        return "".join(lines).encode()
    except UnicodeEncodeError as error:  # a lone surrogate in a str handed over from Python
        raise UserError(f"{source}: a value is not valid Unicode ({error})", fix="fix the value") from None


async def _copy(conn: asyncpg.Connection, store: EventStore, data: bytes, source: str) -> None:
    """COPY in text format: Postgres parses the JSON into jsonb itself, on its own core."""

    async def chunks() -> AsyncIterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(data), 1 << 20):
            yield bytes(view[start : start + (1 << 20)])

    try:
        await store.copy(conn, chunks())
    except asyncpg.UniqueViolationError as error:
        raise UserError(
            f"{source}: a stream was appended to by someone else during the import ({error.detail})",
            fix="import again (nothing was written)",
        ) from None
