"""What every activity class shares: the worker's pool, settings and event store, a connection's generations, and how
an activity fails: an expected mistake (a UserError) or a missing privilege fails the run at once, without retries,
with the one line that names the input and the fix; anything else is retried by Temporal."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import ParamSpec, TypeVar

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from rehydrate.core.database import worker_session
from rehydrate.core.errors import UnknownProjectionError, UserError, WrongWorker, worker_identity
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.models.names import WRONG_WORKER
from rehydrate.sources.pools import Sources
from rehydrate.sources.store import EventStore

P = ParamSpec("P")
T = TypeVar("T")


def non_retryable(error: UserError) -> ApplicationError:
    """The failure a UserError becomes: its type name, its message and fix, no retry."""
    return ApplicationError(str(error), type=type(error).__name__, non_retryable=True)


def wrong_worker(error: UnknownProjectionError | WrongWorker) -> ApplicationError:
    """The failure of a task this worker must not run (see WrongWorker): named with the worker, not retried here
    (the same worker would take it again); the workflow schedules it again and another worker may take it."""
    return ApplicationError(f"worker {worker_identity()}: {error}", type=WRONG_WORKER, non_retryable=True)


def user_errors_fail_the_run(activity: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap an activity so that a UserError (a bad projection, a bad event) or a missing privilege fails its workflow
    run instead of being retried for ever."""

    @functools.wraps(activity)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await activity(*args, **kwargs)
        except (UnknownProjectionError, WrongWorker) as error:
            raise wrong_worker(error) from None
        except UserError as error:
            raise non_retryable(error) from None
        except asyncpg.InsufficientPrivilegeError as error:
            message = UserError(
                f"the worker's database role lacks a privilege: {error}",
                fix="grant what `rehydrate db grants ROLE` prints (docs: a least-privilege role), then start again",
            )
            raise ApplicationError(str(message), type="InsufficientPrivilege", non_retryable=True) from None

    return run


def heartbeats(step: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap an activity so that it heartbeats while it runs, every third of its heartbeat timeout. A long statement
    (an index, ANALYZE, a catch-up) awaits the database with the event loop free, so a worker that dies inside the
    step is noticed after the heartbeat timeout, not after the step's time limit (an hour or two). Scheduled without
    a heartbeat timeout (a run started by an earlier release), it does nothing more."""

    @functools.wraps(step)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        timeout = activity.info().heartbeat_timeout
        if not timeout:
            return await step(*args, **kwargs)
        every = max(timeout.total_seconds() / 3, 0.1)

        async def beat() -> None:
            while True:
                activity.heartbeat()
                await asyncio.sleep(every)

        beating = asyncio.create_task(beat())
        try:
            return await step(*args, **kwargs)
        finally:
            beating.cancel()

    return run


class Activities:
    """Base of the activity classes: each method of a subclass is one activity, run with the worker's pool."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.store = EventStore(pool, settings.schema_name)
        # The sources the projections read, opened on first use; those in other databases with a worker's sessions.
        self.sources = Sources(self.store, session=worker_session(settings))

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool, held for the block; dropped on the spot if the activity is cancelled meanwhile.

        Temporal cancels an activity whose heartbeats stopped (the worker's SDK times it out locally, as the server
        does) or that was cancelled. Left to asyncpg, the cancellation would then send a cancel request over a new
        connection and a ROLLBACK over this one, and wait for both without a bound: a worker cut off from Postgres
        would hang there, its activity slot taken, for as long as the network is down. Closing the socket instead
        frees the slot at once; Postgres rolls the transaction back when it sees the close, or, when the close
        cannot reach it, when the session's own timeouts end it (core.database.worker_session)."""
        async with self.pool.acquire() as conn:
            if not activity.in_activity():
                yield conn
                return
            watch = asyncio.ensure_future(activity.wait_for_cancelled())
            watch.add_done_callback(lambda done: done.cancelled() or conn.terminate())
            try:
                yield conn
            except Exception:
                if watch.done() and not watch.cancelled():
                    raise asyncio.CancelledError from None  # the error is the dropped connection's
                raise
            finally:
                watch.cancel()

    @asynccontextmanager
    async def generations(self) -> AsyncIterator[Generations]:
        """The generations, on a connection held for the block (see `connection`)."""
        async with self.connection() as conn:
            yield Generations(conn, self.sources, self.settings.read_model_schema)
