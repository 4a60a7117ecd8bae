"""The sources one process reads, opened once: rehydrate's own store, and each declared source on the read models'
database or on a pool of its own, its columns inspected on first use."""

from __future__ import annotations

import asyncio

import asyncpg

from rehydrate.core.database import create_pool
from rehydrate.core.errors import UserError
from rehydrate.core.settings import redact_url
from rehydrate.sources.declaration import Source
from rehydrate.sources.reading import EventSource
from rehydrate.sources.store import EventStore

# Connections of a source in another database, per process: a chunk, a catch-up or a plan holds one at a time.
POOL_SIZE = 8


class Sources:
    """rehydrate's own store (`own`) and the sources opened so far; `close` closes the pools it made."""

    def __init__(self, own: EventStore) -> None:
        self.own = own
        self._opened: dict[str, EventSource] = {}
        self._pools: list[asyncpg.Pool] = []
        self._lock = asyncio.Lock()

    async def of(self, source: Source | None) -> EventSource:
        """The reader of `source` (None: rehydrate's own store)."""
        if source is None:
            return self.own
        opened = self._opened.get(source.name)
        if opened is not None and opened.mapping == source.table:
            return opened
        async with self._lock:
            opened = self._opened.get(source.name)
            if opened is None or opened.mapping != source.table:
                opened = await self._open(source)
                self._opened[source.name] = opened
        return opened

    async def _open(self, source: Source) -> EventSource:
        url = source.database_url
        if url is None:
            reader = EventSource(self.own.pool, source.table, source.name)
        else:
            try:
                pool = await create_pool(url, max_size=POOL_SIZE)
            except UserError as error:
                raise UserError(
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
        self._pools.clear()
        self._opened.clear()
