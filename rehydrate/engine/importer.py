"""Bulk import of events from JSON Lines through COPY, in one transaction (into an empty store, one COPY fed while a
thread parses, and the indexes but the primary key built after the load).

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
from dataclasses import dataclass, field
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
_FIELDS = frozenset({"stream_id", "type", "data", "stream_version", "schema_version", "metadata", "recorded_at"})
# What an import into an empty store hands COPY at a time: the thread that parses stays this far ahead.
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportProgress:
    """How far an import has come: the events handed to Postgres so far; `indexing` once they all are and an empty
    store's indexes are being built."""

    events: int
    indexing: bool = False


@dataclass(frozen=True)
class ImportReport:
    events: int
    streams: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class JsonLines:
    """(line number, decoded object) for each non-blank line of a JSON Lines file; a line that is not JSON stops with
    its number. `size` and `bytes_read` say how far the reading has come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
        except OSError as error:
            raise _unreadable(path, error) from None
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        path, loads = self.path, orjson.loads
        self.bytes_read = 0
        try:
            # Big reads, unbuffered: the thread that parses gives the interpreter up at each read and waits to have
            # it back, and the batches it hands over come later (1M events: COPY waited 3.3-3.9 s for them at 8 KiB,
            # 1.8-2.2 at 4 MiB).
            handle = path.open("rb", buffering=0)
        except OSError as error:
            raise _unreadable(path, error) from None
        number = 0
        pending: list[bytes] = []  # the start of a line that goes on in the next block
        with handle:
            while block := handle.read(READ_BUFFER):
                self.bytes_read += len(block)
                end = block.rfind(b"\n")
                if end < 0:  # a line longer than a block
                    pending.append(block)
                    continue
                pending.append(block[:end])
                lines = b"".join(pending).split(b"\n")
                pending = [block[end + 1 :]]
                for line in lines:
                    number += 1
                    if line and not line.isspace():  # what bytes.strip() strips, without the copy
                        try:
                            value = loads(line)
                        except orjson.JSONDecodeError as error:
                            raise _not_json(path, number, error) from None
                        yield number, value
            rest = b"".join(pending)
            if rest and not rest.isspace():  # a last line without its newline
                try:
                    value = loads(rest)
                except orjson.JSONDecodeError as error:
                    raise _not_json(path, number + 1, error) from None
                yield number + 1, value


def read_jsonl(path: Path) -> JsonLines:
    """The lines of a JSON Lines file (see `JsonLines`); a file that cannot be read stops here."""
    return JsonLines(path)


def _unreadable(path: Path, error: OSError) -> UserError:
    return UserError(f"cannot read {path}: {error.strerror}", fix="check the file's path")


def _not_json(path: Path, number: int, error: orjson.JSONDecodeError) -> UserError:
    return UserError(f"{path}:{number}: not valid JSON ({error})", fix="fix or remove that line")


def _bad(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}", fix="fix that line and import the file again (nothing was written)")


# An ISO 8601 timestamp with an offset, in the forms Postgres' timestamptz input reads too.
_PLAIN_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}(?::\d{2})?)\Z")
# The separators of its usual form, 2025-01-02T03:04:05+00:00, at every third character from the fifth (70 ns, where
# the regex takes 260; with fromisoformat's check of the digits, the same test).
_USUAL_TIMESTAMP = frozenset({"--T::+:", "--T::-:"})
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


# A line's COPY text, as `_record` and `_quick_record` give it: (stream id, the stream id as COPY text, the line's
# `stream_version` or None, the rest of its COPY line after the version).
Record = tuple[str, str, Any, str]


def _record(where: Callable[[], str], line: Any, now: str) -> Record:
    """Check a line and write it for COPY, or raise naming what is wrong with it (`where` names the line, `now` is the
    time of events that carry none). Every line `_quick_record` leaves comes here."""
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
    return stream_id, _text(stream_id), line.get("stream_version"), rest


def _quick_record(line: Any, now: str, types: dict[str, str]) -> Record | None:
    """`_record` of the usual line, in two thirds of its time (1.1 µs against 1.6 here); None for a line it does not
    clear, which `_record` then takes (and names what is wrong with it, or writes it). It clears only lines `_record`
    writes exactly so: exact types, nothing COPY must escape in the stream id or type, a timestamp Postgres reads as
    written. `types` keeps the COPY text of each event type met."""
    if type(line) is not dict or not _FIELDS.issuperset(line):
        return None
    stream_id, event_type, data = line.get("stream_id"), line.get("type"), line.get("data")
    # printable: no NUL, tab, newline or carriage return
    if type(stream_id) is not str or not stream_id or not stream_id.isprintable() or "\\" in stream_id:
        return None
    if type(event_type) is not str or type(data) is not dict:
        return None
    type_text = types.get(event_type)
    if type_text is None:
        if not event_type or not event_type.isprintable() or "\\" in event_type:
            return None
        type_text = types[event_type] = event_type
    schema_version = line.get("schema_version", 1)
    if type(schema_version) is not int or not 0 < schema_version <= _MAX_INT:
        return None
    metadata = line.get("metadata")
    meta: str | None = "{}"
    if metadata is None:
        if "metadata" in line:
            return None
    elif type(metadata) is not dict:
        return None
    elif metadata:
        meta = _quick_json(metadata)
    recorded = line.get("recorded_at")
    if recorded is None:
        recorded = now
    elif type(recorded) is not str or not (
        (len(recorded) == 25 and recorded[4:23:3] in _USUAL_TIMESTAMP) or _PLAIN_TIMESTAMP.match(recorded)
    ):
        return None
    else:
        try:
            datetime.fromisoformat(recorded)  # the regex has the form; this, that each field is in range
        except ValueError:
            return None
    payload = _quick_json(data)
    if payload is None or meta is None:
        return None
    return (
        stream_id,
        stream_id,
        line.get("stream_version"),
        f"\t{type_text}\t{schema_version}\t{payload}\t{meta}\t{recorded}\n",
    )


def _quick_json(value: dict[str, Any]) -> str | None:
    """`_json` of a value that is JSON and holds no NUL; None for another."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    if b"\\" in text:
        if b"\\u0000" in text:
            return None
        text = text.replace(b"\\", b"\\\\")
    return text.decode()


Parsed = list[tuple[int, Record]]  # (line number, the line's record)


def _records(batch: Iterable[tuple[int, Any]], source: str, now: str, types: dict[str, str]) -> Parsed:
    """Each line of the batch checked and written for COPY, but for its version."""
    return [
        (number, _quick_record(line, now, types) or _record(lambda number=number: f"{source}:{number}", line, now))  # type: ignore[misc]
        for number, line in batch
    ]


@dataclass
class _Job:
    """What the stages of one import share: the lines still to read, each stream's last version so far, and whom to
    tell how far it has come."""

    lines: Iterator[tuple[int, Any]]
    source: str
    batch_size: int
    progress: Callable[[ImportProgress], None] | None
    known: dict[str, int] = field(default_factory=dict)
    now: str = field(default_factory=lambda: datetime.now(UTC).isoformat())  # the time of events that carry none
    types: dict[str, str] = field(default_factory=dict)  # the COPY text of each event type met

    def next_batch(self) -> Parsed:
        """The next batch, each line checked and written for COPY but for its version (in a thread)."""
        return _records(itertools.islice(self.lines, self.batch_size), self.source, self.now, self.types)

    def report(self, events: int, *, indexing: bool = False) -> None:
        if self.progress is not None:
            self.progress(ImportProgress(events, indexing))


async def import_events(
    store: EventStore,
    lines: Iterable[tuple[int, Any]],
    *,
    source: str = "input",
    batch_size: int = 20_000,
    progress: Callable[[ImportProgress], None] | None = None,
) -> ImportReport:
    """Append every line's event; versions continue each stream unless a line gives `stream_version`,
    which must then be exactly the next one. `progress` is called after each batch, and before the indexes are
    built.

    Into an empty store, one COPY takes the whole file while a thread reads, checks, numbers and writes the lines
    ahead of it (`_Feed`). Into a store with events, each batch's streams are looked up first; a thread checks the
    next batch while Postgres takes the one before.
    """
    started = time.perf_counter()
    job = _Job(iter(lines), source, batch_size, progress)
    with _switching_often():
        async with store.pool.acquire() as conn:
            # Looked at before the transaction: a read in it would hold a share lock until the commit, and two
            # imports into an empty store would each wait for the other's to take the exclusive one (a deadlock).
            looks_empty = await store.is_empty(conn)
            async with conn.transaction():
                deferred = await store.defer_indexes(conn) if looks_empty else []
                # Into an empty store every stream starts at version 1: nothing to look up. Without the table's lock
                # (a role that may not take it), a stream appended to meanwhile by someone else is caught by the
                # unique (stream, version) index, and nothing is written.
                if deferred or await store.is_empty(conn):
                    total = await _load_empty(conn, store, job)
                else:
                    total = await _load(conn, store, job)
                if deferred:
                    job.report(total, indexing=True)
                await store.restore_indexes(conn, deferred)
                await store.notify(conn)
    return ImportReport(total, len(job.known), time.perf_counter() - started)


async def _load_empty(conn: asyncpg.Connection, store: EventStore, job: _Job) -> int:
    feed = _Feed(job)
    try:
        await _copy(conn, store, feed, job.source)
    except Exception:
        if feed.error is None:
            raise
    finally:
        await feed.close()
    if feed.error is not None:
        raise feed.error
    return feed.events


class _Feed:
    """The COPY data of an import into an empty store, made by one thread a batch ahead of the COPY that takes it.

    A bad line ends the data, and the COPY with it, instead of failing the COPY: the import then raises it and its
    transaction rolls back (a failed COPY would also send Postgres a cancel request, to race the rollback)."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._next: asyncio.Future[tuple[int, bytes]] | None = None
        self._pending: memoryview | None = None
        self.events = 0
        self.error: UserError | None = None

    def _batch(self) -> tuple[int, bytes]:
        """The next batch's COPY data (0 events: the end), in the thread: `_numbered(job.next_batch())` in one pass,
        without a record kept per line (they made it a sixth slower)."""
        job = self._job
        known, source, now, types = job.known, job.source, job.now, job.types
        lines = []
        for number, line in itertools.islice(job.lines, job.batch_size):
            stream_id, stream_text, given, rest = _quick_record(line, now, types) or _record(
                lambda number=number: f"{source}:{number}",  # type: ignore[misc]
                line,
                now,
            )
            version = known.get(stream_id, 0) + 1
            if given is not None and given != version:
                raise _not_next(source, number, stream_id, given, version)
            known[stream_id] = version
            lines.append(f"{stream_text}\t{version}{rest}")
        return len(lines), _encoded(lines, source)

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                chunk, self._pending = self._pending[:_COPY_CHUNK], self._pending[_COPY_CHUNK:]
                return bytes(chunk)
            if self.error is not None:
                raise StopAsyncIteration
            if self._next is None:
                self._next = asyncio.ensure_future(asyncio.to_thread(self._batch))
            try:
                size, data = await self._next
            except UserError as error:
                self.error = error
                self._next = None
                raise StopAsyncIteration from None
            self._next = None
            if not size:
                raise StopAsyncIteration
            self.events += size
            self._next = asyncio.ensure_future(asyncio.to_thread(self._batch))  # parsed while this one is sent
            self._pending = memoryview(data)
            self._job.report(self.events)

    async def close(self) -> None:
        """Wait for the thread's batch in progress (the COPY may end before it does)."""
        if self._next is not None:
            with contextlib.suppress(Exception):
                await self._next
            self._next = None


async def _load(conn: asyncpg.Connection, store: EventStore, job: _Job) -> int:
    """Into a store with events: batch by batch, each batch's streams looked up before it is numbered. A pipeline of
    two stages: a thread reads and checks the next batch while Postgres takes the previous one."""
    total = 0
    copying: asyncio.Task[None] | None = None
    try:
        while True:
            batch = await asyncio.to_thread(job.next_batch)
            if copying is not None:
                await copying
                copying = None
            if not batch:
                break
            await _look_up_versions(conn, store, batch, job.known)
            copying = asyncio.create_task(_copy(conn, store, _numbered(batch, job.known, job.source), job.source))
            total += len(batch)
            job.report(total)
    finally:
        if copying is not None:
            # A bad line while a batch was being written: let the COPY end before the rollback.
            with contextlib.suppress(Exception):
                await copying
    return total


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
    new_streams = sorted({stream_id for _, (stream_id, _, _, _) in batch} - known.keys())
    if new_streams:
        known.update({s: 0 for s in new_streams})
        known.update(await store.versions(conn, new_streams))


def _not_next(source: str, number: int, stream_id: str, given: Any, version: int) -> UserError:
    return _bad(
        f"{source}:{number}", f"'stream_version' {given!r} of stream {stream_id!r} is not the next version ({version})"
    )


def _numbered(batch: Parsed, known: dict[str, int], source: str) -> bytes:
    """The batch's COPY data, each event with its stream's next version (`known`: each stream's last version,
    none: a new stream)."""
    lines = []
    for number, (stream_id, stream_text, given, rest) in batch:
        version = known.get(stream_id, 0) + 1
        if given is not None and given != version:
            raise _not_next(source, number, stream_id, given, version)
        known[stream_id] = version
        lines.append(f"{stream_text}\t{version}{rest}")
    return _encoded(lines, source)


def _encoded(lines: list[str], source: str) -> bytes:
    try:
        return "".join(lines).encode()
    except UnicodeEncodeError as error:  # a lone surrogate in a str handed over from Python
        raise UserError(f"{source}: a value is not valid Unicode ({error})", fix="fix the value") from None


async def _copy(conn: asyncpg.Connection, store: EventStore, data: bytes | AsyncIterator[bytes], source: str) -> None:
    """COPY in text format: Postgres parses the JSON into jsonb itself, on its own core."""

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(data), _COPY_CHUNK):
            yield bytes(view[start : start + _COPY_CHUNK])

    try:
        await store.copy(conn, chunks(data) if isinstance(data, bytes) else data)
    except asyncpg.UniqueViolationError as error:
        raise UserError(
            f"{source}: a stream was appended to by someone else during the import ({error.detail})",
            fix="import again (nothing was written)",
        ) from None
