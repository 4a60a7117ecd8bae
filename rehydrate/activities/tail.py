"""The tail's activity: apply new events to a projection's active generation as they commit, until cancelled; and
how a tail is started (by a worker for the projections it serves, by a swap, by `rehydrate tail start`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from rehydrate.core.errors import DatabaseUnreachable, SourceUnavailable, UnknownProjectionError, UserError
from rehydrate.core.settings import Settings
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.projections import Registry
from rehydrate.models import TailInput, TailRun
from rehydrate.models.names import TAIL, tail_workflow_id
from rehydrate.sources.declaration import Source
from rehydrate.sources.log import LogSource
from rehydrate.sources.reading import EventSource

log = logging.getLogger("rehydrate.tail")

_LAG_EVERY_SECONDS = 5.0  # the lag gauge's count query runs at most this often
# What a tail waits out inside its activity: the database or the source unreachable, a connection cut.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalClientError,  # asyncpg's state when a connection is cut during a statement
    SourceUnavailable,
)
_MAX_BACKOFF_SECONDS = 15.0
_REPORT_EVERY_SECONDS = 300.0  # while an outage lasts, one log line this often
_RECOVERED_AFTER_SECONDS = 5.0  # an outage ends after this long without a failure (a flapping link is one outage)


class _Outage:
    """A tail's transient failures: one warning when they start (and one every few minutes while they last), the
    error recorded on the projection for `rehydrate projections`, one line when batches apply again and the record
    cleared. Meanwhile the activity backs off and heartbeats, so Temporal neither retries it nor logs a stack trace
    per attempt."""

    def __init__(self, projection: str, pool: asyncpg.Pool, schema: str) -> None:
        self.projection = projection
        self.pool = pool
        self.schema = schema
        self.since: float | None = None
        self.failed_at = 0.0
        self.attempts = 0
        self.told = 0.0
        self.recorded = False  # the error is on the projection's row (to clear once batches apply again)

    async def failed(self, error: BaseException, checkpoint: int | None, deadline: float) -> None:
        now = self.failed_at = time.monotonic()
        self.attempts += 1
        problem = f"{type(error).__name__}: {error}".strip()
        if self.since is None:
            self.since = self.told = now
            log.warning("tail of %s cannot apply batches (%s); retrying with backoff", self.projection, problem)
        elif now - self.told >= _REPORT_EVERY_SECONDS:
            self.told = now
            log.warning(
                "tail of %s still cannot apply batches: %d attempts in %.0f s (%s)",
                self.projection,
                self.attempts,
                now - self.since,
                problem,
            )
        if not self.recorded:
            self.recorded = await self._record(f"retrying: {problem}")
        end = min(now + min(2.0 ** (self.attempts - 1), _MAX_BACKOFF_SECONDS), deadline)
        while time.monotonic() < end and not activity.is_worker_shutdown():
            activity.heartbeat(checkpoint)
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))

    async def recovered(self) -> None:
        """A batch applied: the outage is over once none has failed for a few seconds."""
        if self.since is not None and time.monotonic() - self.failed_at >= _RECOVERED_AFTER_SECONDS:
            log.warning(
                "tail of %s applies batches again after %d failed attempts in %.1f s",
                self.projection,
                self.attempts,
                time.monotonic() - self.since,
            )
            self.since, self.attempts = None, 0
        if self.recorded and self.since is None:  # (tried again after each batch until the record is cleared)
            self.recorded = not await self._record(None)

    async def _record(self, error: str | None) -> bool:
        """Best effort (the database may be what is down): whether it was recorded."""
        try:
            async with asyncio.timeout(2), self.pool.acquire() as conn:
                await Catalog(conn, self.schema).set_tail_error(self.projection, error)
        except Exception:
            return False
        return True


async def ensure_tail(client: Client, projection: str, task_queue: str) -> str:
    """Start the projection's tail workflow on `task_queue` unless it runs; returns its workflow id.

    The id starts with the task queue, so the tail of another installation sharing the namespace (on its own queue)
    is never touched. A tail under the id a non-default queue's tail had before ids carried their queue, running on
    this same queue, is this installation's: it is replaced, so that one tail applies batches.
    """
    workflow_id = tail_workflow_id(projection, task_queue)
    unprefixed = tail_workflow_id(projection)
    if unprefixed != workflow_id:
        with contextlib.suppress(RPCError):
            older = client.get_workflow_handle(unprefixed)
            described = await older.describe()
            if described.status == Status.RUNNING and described.task_queue == task_queue:
                await older.terminate(reason=f"replaced by {workflow_id}")
    await client.start_workflow(
        TAIL,
        TailInput(projection),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
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
        wake = asyncio.Event()
        declared = projection.event_source
        source: EventSource | LogSource | None = None
        # Writers that NOTIFY wake the tail at once; without a channel (or from a log) it polls every `poll_seconds`.
        channel: str | None = None
        listener: asyncpg.Connection | None = None

        def on_notify(*_: Any) -> None:
            wake.set()

        listen_url = self.database_url
        if isinstance(declared, Source) and declared.database_url is not None:
            listen_url = declared.database_url
        deadline = time.monotonic() + input.run_seconds
        applied = batches = 0
        lag_due = 0.0
        generation = checkpoint = None
        outage = _Outage(projection.name, self.pool, self.settings.schema_name)
        try:
            # On worker shutdown, return (not fail): the workflow runs the tail again on another worker.
            while time.monotonic() < deadline and not activity.is_worker_shutdown():
                wake.clear()
                moved = 0
                try:
                    # Set up inside the loop: a database that is down at the start is waited out like one that goes
                    # down later.
                    if source is None:
                        async with self.connection() as conn:
                            # What `rehydrate projections` compares with the code its generation was built with.
                            await Catalog(conn, self.settings.schema_name).set_tail_code(
                                projection.name, projection.fingerprint
                            )
                        source = await self.sources.any(declared)
                        if isinstance(source, EventSource):
                            channel = source.mapping.notify_channel
                    if channel is not None and (listener is None or listener.is_closed()):
                        listener = await connect(listen_url)  # down or restarting: DatabaseUnreachable, waited out
                        await listener.add_listener(channel, on_notify)
                    async with self.generations() as generations:
                        result = await generations.tail_batch(projection, input.batch_size)
                    if result is not None:
                        generation, moved, checkpoint = result
                        applied += moved
                        batches += 1 if moved else 0
                        metrics.events_applied(projection.name, moved)
                        if time.monotonic() >= lag_due:
                            lag_due = time.monotonic() + _LAG_EVERY_SECONDS
                            lag: tuple[int, float] | None
                            if isinstance(source, LogSource):
                                async with self.generations() as generations:
                                    behind = await generations.log_lag(projection, generation, source)
                                lag = None if behind is None else (behind, 0.0)
                            else:
                                async with self.connection() as conn, source.reading(conn) as reading:
                                    lag = await source.lag(reading, checkpoint, projection.event_types)
                            if lag is not None:
                                metrics.tail_lag(projection.name, *lag)
                except DatabaseUnreachable as error:  # the database or a source's down when the tail (re)connects
                    await outage.failed(error, checkpoint, deadline)
                    continue
                except UserError as error:  # a poison event, or a generation the code cannot write
                    async with self.connection() as conn:
                        await Catalog(conn, self.settings.schema_name).set_tail_error(projection.name, str(error))
                    raise ApplicationError(
                        f"tail stopped: {error}", type=type(error).__name__, non_retryable=True
                    ) from None
                except _TRANSIENT as error:
                    await outage.failed(error, checkpoint, deadline)
                    continue
                await outage.recovered()
                activity.heartbeat(checkpoint)
                if moved == 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), input.poll_seconds)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
        return TailRun(applied, batches, generation, checkpoint)
