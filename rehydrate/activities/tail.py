"""The tail's activity: apply new events to a projection's active generation as they commit, until cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from rehydrate import catalog, metrics
from rehydrate.database import connect
from rehydrate.errors import ProjectionError, UserError
from rehydrate.models import TailInput, TailRun
from rehydrate.projections import Registry
from rehydrate.settings import Settings
from rehydrate.store import EventStore

_LAG_EVERY_SECONDS = 5.0  # the lag gauge's count query runs at most this often


class TailActivities:
    """Holds the worker's pool, the database URL (for a LISTEN connection of its own) and the projections."""

    def __init__(self, pool: asyncpg.Pool, database_url: str, registry: Registry, settings: Settings) -> None:
        self.pool = pool
        self.database_url = database_url
        self.registry = registry
        self.settings = settings
        self.store = EventStore(pool, settings.schema_name)

    @activity.defn(name="rehydrate.run_tail")
    async def run_tail(self, input: TailInput) -> TailRun:
        """Apply batches of new events, each with its checkpoint in one transaction, for `run_seconds`.

        Wakes on the appenders' NOTIFY, and polls every `poll_seconds` in case a notification was missed or
        the high-water mark was held back by a long transaction. A poison event stops the tail: its error is
        recorded on the projection and the activity fails without retry.
        """
        try:
            projection = self.registry.get(input.projection)
        except UserError as error:
            raise ApplicationError(str(error), type=type(error).__name__, non_retryable=True) from None
        wake = asyncio.Event()
        listener = await connect(self.database_url)

        def on_notify(*_: Any) -> None:
            wake.set()

        await listener.add_listener(self.store.channel, on_notify)
        deadline = time.monotonic() + input.run_seconds
        applied = batches = 0
        lag_due = 0.0
        generation = checkpoint = None
        try:
            # On worker shutdown, return (not fail): the workflow runs the tail again on another worker.
            while time.monotonic() < deadline and not activity.is_worker_shutdown():
                wake.clear()
                try:
                    async with self.pool.acquire() as conn:
                        result = await catalog.tail_batch(
                            conn, self.store, self.settings.read_model_schema, projection, input.batch_size
                        )
                except ProjectionError as error:
                    async with self.pool.acquire() as conn:
                        await catalog.set_tail_error(conn, self.settings.schema_name, projection.name, str(error))
                    raise ApplicationError(
                        f"tail stopped: {error}", type="ProjectionError", non_retryable=True
                    ) from None
                moved = 0
                if result is not None:
                    generation, moved, checkpoint = result
                    applied += moved
                    batches += 1 if moved else 0
                    metrics.events_applied(projection.name, moved)
                    if time.monotonic() >= lag_due:
                        lag_due = time.monotonic() + _LAG_EVERY_SECONDS
                        async with self.pool.acquire() as conn:
                            metrics.tail_lag(
                                projection.name, *await catalog.lag(conn, self.store, projection, checkpoint)
                            )
                activity.heartbeat(checkpoint)
                if moved == 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), input.poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await listener.close()
        return TailRun(applied, batches, generation, checkpoint)
