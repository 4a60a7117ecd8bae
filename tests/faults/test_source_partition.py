"""A table source in another database, cut off from the worker by a silent partition in the middle of a chunk's read
(a proxy that holds every byte and closes nothing): the worker's sessions to that database carry the worker's
timeouts, so the source's server ends the read's transaction by itself, and a read cancelled meanwhile (its chunk's
heartbeats stopped) lets go of its connection at once instead of waiting on a server that cannot answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlencode

import asyncpg
import pytest

from rehydrate import EventStore
from rehydrate.core.database import worker_session
from rehydrate.core.settings import Settings
from rehydrate.sources.pools import Sources
from tests.helpers import domain, legacy
from tests.helpers.proxy import Proxy
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.faults

READER = "rehydrate-source-reader"
STATE = "SELECT state FROM pg_stat_activity WHERE pid = $1"


async def test_a_read_from_a_source_cut_off_mid_chunk_ends_on_both_sides(
    settings: Settings, store: EventStore, other_database: str
) -> None:
    events_db = await asyncpg.connect(other_database)
    proxy = Proxy(other_database).start()
    worker = settings.model_copy(update={"db_idle_in_transaction_timeout": 3.0, "db_peer_timeout": 3.0})
    try:
        await events_db.execute(legacy.CREATE)
        await legacy.write(events_db, domain.random_history(5, streams=5, events=50))
        url = proxy.url(other_database)
        url = f"{url}{'&' if '?' in url else '?'}{urlencode({'application_name': READER})}"
        async with Sources(store, session=worker_session(worker)) as sources, store.pool.acquire() as conn:
            source = await sources.of(legacy.source("gap_free", url))
            reading, cut = asyncio.Event(), asyncio.Event()
            backend: list[int] = []

            async def read() -> None:
                async with source.reading(conn) as own:
                    backend.append(await own.fetchval("SELECT pg_backend_pid()"))
                    assert await own.fetchval("SELECT count(*) FROM legacy_events") == 50
                    # What a worker's sessions ask of Postgres reached the source's server too. (Its TCP settings
                    # do not show here: the proxy reaches the server over its Unix socket.)
                    assert await own.fetchval("SHOW idle_in_transaction_session_timeout") == "3s"
                    reading.set()
                    await cut.wait()  # the whole of the next statement is held, none of it half sent
                    await own.fetchval("SELECT 1")  # held by the partition: never answered

            reading_task = asyncio.create_task(read())
            try:
                await cut_off_mid_read(proxy, events_db, reading_task, (reading, cut), backend)
            finally:
                proxy.heal()  # first: a read that did not let go is answered, and ends
                if not reading_task.done():
                    reading_task.cancel()
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(reading_task, 30)
            # The pool goes on with a new connection once the network is back.
            async with source.reading(conn) as own:
                assert await own.fetchval("SELECT count(*) FROM legacy_events") == 50
    finally:
        proxy.heal()
        proxy.close()
        await events_db.close()


async def cut_off_mid_read(
    proxy: Proxy,
    events_db: asyncpg.Connection,
    reading_task: asyncio.Task[None],
    events: tuple[asyncio.Event, asyncio.Event],
    backend: list[int],
) -> None:
    reading, cut = events
    waiting = asyncio.create_task(reading.wait())
    await asyncio.wait({reading_task, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if reading_task.done():
        reading_task.result()  # its failure, said
    assert reading.is_set()
    proxy.partition()
    cut_at = time.monotonic()
    cut.set()
    # The server sees its session idle inside the read's transaction, and ends it after 3 s.
    [pid] = backend

    async def idle_in_its_transaction() -> bool:
        return bool(await events_db.fetchval(STATE, pid) == "idle in transaction")

    async def ended_by_the_server() -> bool:
        return await events_db.fetchval(STATE, pid) is None

    await eventually(idle_in_its_transaction, within=2)
    ended_from = time.monotonic()
    await eventually(ended_by_the_server, within=10)
    ended = time.monotonic()
    assert ended - ended_from < 4.5
    # Meanwhile the worker's read still waits (nothing reaches it); its chunk is cancelled: it returns at once.
    assert not reading_task.done()
    cancelled = time.monotonic()
    reading_task.cancel()
    await asyncio.wait({reading_task}, timeout=2)
    assert reading_task.cancelled(), "the cancelled read still waits on the cut-off server"
    returned = time.monotonic() - cancelled
    assert returned < 2
    print(
        f"\nthe server ended the read's session {ended - cut_at:.2f} s after the cut; the cancelled read returned in "
        f"{returned * 1000:.0f} ms"
    )
