"""A replay of a projection with a child table (orders and their lines) survives its worker being SIGKILLed in the
middle of a chunk while orders go on changing: both tables equal the plain fold of every event afterwards, a line
or an order applied twice or lost shows (quantities and totals are sums)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from pathlib import Path

from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.examples import order_lines as example
from rehydrate.models import ReplayInput
from rehydrate.sources.pools import Sources
from tests.helpers import domain, order_lines
from tests.helpers.workers import kill_workers, replay_killing_a_worker_mid_chunk

TIME_LIMIT = 150.0


async def test_a_two_table_replay_survives_a_worker_kill_while_orders_change(
    client: Client, settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    await order_lines.history(store, 8000)
    env = {"REHYDRATE_PROJECTIONS": "tests.helpers.slow_orders"}
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    writing = True

    async def writer() -> int:
        """More lines on the first orders (some stored, some not yet built), a line removed, an order archived."""
        written = 0
        while writing:
            order = f"order-{written % 40:07d}"
            item = {"sku": f"sku-{written % 7:04d}", "quantity": 1, "unit_price_cents": 100}
            kind = "ItemRemoved" if written % 5 == 4 else "ItemAdded"
            await store.append(order, [NewEvent(kind, item)])
            if written % 97 == 96:
                await store.append(f"order-{written % 40 + 40:07d}", [NewEvent("OrderArchived", {})])
            written += 1
            await asyncio.sleep(0.02)
        return written

    writes = asyncio.create_task(writer())
    try:
        died, retried = await asyncio.wait_for(
            replay_killing_a_worker_mid_chunk(
                client,
                settings,
                store.pool,
                ReplayInput("orders", lanes=3, chunk_size=200, max_parallel=3, heartbeat_timeout_seconds=2),
                workers,
                logs,
                env,
            ),
            TIME_LIMIT,
        )
        writing = False
        written = await writes
        sources = Sources(store)
        try:
            async with store.pool.acquire() as conn:
                generations = Generations(conn, sources, settings.read_model_schema)
                while (await generations.tail_batch(example.orders, 100_000) or (0, 0, 0))[1]:
                    pass
        finally:
            await sources.close()
        built = await order_lines.read(store.pool)
        assert built == order_lines.oracle(await domain.all_events(store))
        assert len(built[1]) > len(built[0]) > 500
    finally:
        writing = False
        with contextlib.suppress(BaseException):
            await writes
        await kill_workers(workers, logs)
    assert workers["A"].returncode == -signal.SIGKILL
    assert died and died <= retried, f"the chunks that died with worker A were retried: {died} in {retried}"
    assert written >= 20, "orders changed during the build and the swap"
