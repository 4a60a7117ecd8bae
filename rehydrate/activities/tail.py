"""The tail's activity: apply new events to a projection's active generation as they commit, until cancelled; and
how a tail is started (by a worker for the projections it serves, by a swap, by `rehydrate tail start`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.client import Client
from temporalio.client import WorkflowExecutionStatus as Status
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from rehydrate.activities._common import Activities, wrong_worker
from rehydrate.core import metrics
from rehydrate.core.database import connect
from rehydrate.core.errors import ProjectionError, UnknownProjectionError
from rehydrate.core.settings import Settings
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.projections import Registry
from rehydrate.models import TailInput, TailRun
from rehydrate.models.names import TAIL, tail_workflow_id
from rehydrate.sources.declaration import KafkaSource
from rehydrate.sources.log import LogSource

_LAG_EVERY_SECONDS = 5.0  # the lag gauge's count query runs at most this often


async def ensure_tail(client: Client, projection: str, task_queue: str) -> str:
    """Start the projection's tail workflow unless it already runs on `task_queue`; returns its workflow id.

    A tail left running on another task queue (the workers moved to a new one) would never be picked up
    again: it is replaced.
    """
    workflow_id = tail_workflow_id(projection)
    policy = WorkflowIDConflictPolicy.USE_EXISTING
    with contextlib.suppress(RPCError):
        running = await client.get_workflow_handle(workflow_id).describe()
        if running.status == Status.RUNNING and running.task_queue != task_queue:
            policy = WorkflowIDConflictPolicy.TERMINATE_EXISTING
    await client.start_workflow(
        TAIL,
        TailInput(projection),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=policy,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"Tail of {projection}",
    )
    return workflow_id


class TailActivities(Activities):
    """The tail's activity, with the worker's projections and the database URL (for a LISTEN connection of its own)."""

    def __init__(self, pool: asyncpg.Pool, database_url: str, registry: Registry, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.database_url = database_url
        self.registry = registry

    @activity.defn(name="rehydrate.run_tail")
    async def run_tail(self, input: TailInput) -> TailRun:
        """Apply batches of new events, each with its checkpoint in one transaction, for `run_seconds`.

        Wakes on the appenders' NOTIFY, and polls every `poll_seconds` in case a notification was missed or
        the high-water mark was held back by a long transaction. A poison event stops the tail: its error is
        recorded on the projection and the activity fails without retry.
        """
        try:
            projection = self.registry.get(input.projection)
        except UnknownProjectionError as error:
            raise wrong_worker(error) from None
        async with self.pool.acquire() as conn:
            # What `rehydrate projections` compares with the code its generation was built with (STALE).
            await Catalog(conn, self.settings.schema_name).set_tail_code(projection.name, projection.fingerprint)
        wake = asyncio.Event()
        source = await self.sources.any(projection.event_source)
        declared = projection.event_source
        # Writers that NOTIFY wake the tail at once; without a channel (or from a log) it polls every `poll_seconds`.
        channel = None if isinstance(source, LogSource) else source.mapping.notify_channel
        listener = None
        if channel is not None and not isinstance(declared, KafkaSource):
            url = self.database_url if declared is None or declared.database_url is None else declared.database_url
            listener = await connect(url)

            def on_notify(*_: Any) -> None:
                wake.set()

            await listener.add_listener(channel, on_notify)
        deadline = time.monotonic() + input.run_seconds
        applied = batches = 0
        lag_due = 0.0
        generation = checkpoint = None
        try:
            # On worker shutdown, return (not fail): the workflow runs the tail again on another worker.
            while time.monotonic() < deadline and not activity.is_worker_shutdown():
                wake.clear()
                try:
                    async with self.generations() as generations:
                        result = await generations.tail_batch(projection, input.batch_size)
                except ProjectionError as error:
                    async with self.pool.acquire() as conn:
                        await Catalog(conn, self.settings.schema_name).set_tail_error(projection.name, str(error))
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
                        if isinstance(source, LogSource):
                            async with self.generations() as generations:
                                lag = await generations.log_lag(projection, generation, source), 0.0
                        else:
                            async with self.pool.acquire() as conn, source.reading(conn) as reading:
                                lag = await source.lag(reading, checkpoint, projection.event_types)
                        metrics.tail_lag(projection.name, *lag)
                activity.heartbeat(checkpoint)
                if moved == 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), input.poll_seconds)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
        return TailRun(applied, batches, generation, checkpoint)
