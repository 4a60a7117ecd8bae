"""The sources one process reads, opened once: rehydrate's own store, each declared table source on the read models'
database or on a pool of its own, its columns inspected on first use, each Kafka source's consumers and each Kinesis
source's client."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from rehydrate.core.database import create_pool
from rehydrate.core.errors import UserError
from rehydrate.core.settings import redact_url
from rehydrate.sources.declaration import AnySource, KafkaSource, KinesisSource, LogSourceDeclaration, Source
from rehydrate.sources.log import LogSource
from rehydrate.sources.reading import EventSource
from rehydrate.sources.store import EventStore

# Connections of a source in another database, per process: a chunk, a catch-up or a plan holds one at a time.
POOL_SIZE = 8


class Sources:
    """rehydrate's own store (`own`) and the sources opened so far; `close` closes the pools it made."""

    def __init__(self, own: EventStore, session: dict[str, Any] | None = None) -> None:
        """`session`: asyncpg's connection keywords for the pools of sources in other databases (a worker's:
        core.database.worker_session, so that a source's database cut off mid-read does not hold a chunk for ever)."""
        self.own = own
        self._session = session or {}
        self._opened: dict[str, EventSource] = {}
        self._logs: dict[str, tuple[LogSourceDeclaration, LogSource]] = {}
        self._pools: list[asyncpg.Pool] = []
        self._lock = asyncio.Lock()

    async def any(self, source: AnySource | None) -> EventSource | LogSource:
        """The reader of `source`, a table's or a log's (None: rehydrate's own store)."""
        if isinstance(source, KafkaSource | KinesisSource):
            return await self._log(source)
        return await self.of(source)

    async def of(self, source: AnySource | None, doing: str = "this") -> EventSource:
        """The reader of a table `source` (None: rehydrate's own store); a UserError naming `doing` for a log."""
        if source is None:
            return self.own
        if isinstance(source, KafkaSource):
            raise UserError(
                f"source {source.name!r} is a Kafka topic: {doing} reads event tables only",
                fix="see the Kafka page of the docs for what a Kafka source supports",
            )
        if isinstance(source, KinesisSource):
            raise UserError(
                f"source {source.name!r} is a Kinesis stream: {doing} reads event tables only",
                fix="see the Kinesis page of the docs for what a Kinesis source supports",
            )
        opened = self._opened.get(source.name)
        if opened is not None and opened.mapping == source.table:
            return opened
        async with self._lock:
            opened = self._opened.get(source.name)
            if opened is None or opened.mapping != source.table:
                opened = await self._open(source)
                self._opened[source.name] = opened
        return opened

    async def _log(self, source: LogSourceDeclaration) -> LogSource:
        opened = self._logs.get(source.name)
        if opened is not None and opened[0] == source:
            return opened[1]
        async with self._lock:
            opened = self._logs.get(source.name)
            if opened is None or opened[0] != source:
                opened = (source, await open_log(source))
                self._logs[source.name] = opened
        return opened[1]

    async def _open(self, source: Source) -> EventSource:
        url = source.database_url
        if url is None:
            reader = EventSource(self.own.pool, source.table, source.name)
        else:
            try:
                pool = await create_pool(url, max_size=POOL_SIZE, **self._session)
            except UserError as error:  # the same kind: a tail waits out a source's database that does not answer
                raise type(error)(
                    f"source {source.name!r}: {error.message}",
                    fix=f"check REHYDRATE_SOURCE_{source.name.upper()}_URL (or the source's url): {redact_url(url)}",
                ) from None
            self._pools.append(pool)
            reader = EventSource(pool, source.table, source.name, external=True)
        await reader.inspect()
        return reader

    async def __aenter__(self) -> Sources:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        for pool in self._pools:
            await pool.close()
        for _, log in self._logs.values():
            await log.close()
        self._pools.clear()
        self._opened.clear()
        self._logs.clear()


async def open_log(source: LogSourceDeclaration) -> LogSource:
    """The started reader of a Kafka or Kinesis source (its client is imported here: an optional dependency)."""
    if isinstance(source, KinesisSource):
        try:
            from rehydrate.sources.kinesis import KinesisLog
        except ImportError:
            raise UserError(
                f"source {source.name!r} is a Kinesis stream, and boto3 is not installed",
                fix="pip install 'rehydrate[kinesis]'",
            ) from None
        stream = KinesisLog(source)
        await stream.start()
        return stream
    try:
        from rehydrate.sources.kafka import KafkaLog
    except ImportError:
        raise UserError(
            f"source {source.name!r} is a Kafka topic, and aiokafka is not installed",
            fix="pip install 'rehydrate[kafka]'",
        ) from None
    log = KafkaLog(source)
    await log.start()
    return log
