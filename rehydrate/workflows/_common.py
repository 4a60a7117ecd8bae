"""What every workflow shares: the activities' retry policy, the one line of a failure, cancellation checks, and
running a set of chains (lanes, partitions) in parallel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError, FailureError
from temporalio.types import MethodAsyncSingleParam, ParamType, ReturnType, SelfType

with workflow.unsafe.imports_passed_through():
    from rehydrate.models.names import WRONG_WORKER

T = TypeVar("T")
NO_WORKER = "NoWorker"  # the error type of a run no worker could serve within its patience
_AT_ONCE = 3  # refusals of one task rescheduled without waiting

# An input that does not fit the workflow's type (a start from the Web UI with `{"lanes": "4"}`, or with no projection)
# fails the run, with the converter's message naming the field. Otherwise the SDK fails the workflow *task*, which
# Temporal retries for ever: a run shown as running that never starts. A TypeError raised by workflow code fails the
# run too; such a bug would fail every retry of the task the same way.
INPUT_ERRORS: Sequence[type[BaseException]] = (TypeError,)


def expect(input: object, kind: type[T], example: str) -> T:
    """The run's input, once sure it is a `kind` (a start from the Web UI may send null, a string or a list)."""
    if not isinstance(input, kind):
        raise ApplicationError(
            f"the input is not a {kind.__name__} but {type(input).__name__}: start the workflow with {example}",
            type="BadInput",
            non_retryable=True,
        )
    return input


RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(seconds=30)
)


def failure_message(error: BaseException) -> str:
    """The message of the failure at the bottom of an activity's or a child workflow's chain: the one line that
    names what went wrong."""
    while isinstance(error, (ActivityError, ChildWorkflowError)) and error.cause is not None:
        error = error.cause
    return str(error.message if isinstance(error, FailureError) else error)


def raise_if_cancel_requested() -> None:
    """A cancel that arrives while an activity is finishing is absorbed when the activity then completes (the SDK
    lets the activity's outcome stand), so the request is checked before each next step: a cancelled run never
    starts another one."""
    if workflow.cancellation_reason() is not None:
        raise asyncio.CancelledError()


async def run_all(chains: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run `chains` at once and wait for all; when one fails (or the run is cancelled), cancel the others, wait for
    them to end, and raise."""
    tasks = [asyncio.create_task(chain) for chain in chains]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def execute_chunk(
    activity: MethodAsyncSingleParam[SelfType, ParamType, ReturnType],
    input: ParamType,
    *,
    heartbeat: timedelta,
    start_to_close: timedelta,
    summary: str,
) -> ReturnType:
    """Run one chunk activity: it heartbeats (a dead worker's chunk is retried elsewhere after `heartbeat`), it is
    retried from its committed cursor, and a cancel waits for it to stop (it learns of it at its next heartbeat)."""
    return await workflow.execute_activity_method(
        activity,
        input,
        start_to_close_timeout=start_to_close,
        heartbeat_timeout=heartbeat,
        retry_policy=RETRY,
        cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        summary=summary,
    )


async def served(
    call: Callable[[], Awaitable[T]],
    *,
    patience: timedelta | None,
    waiting: Callable[[str], None] | None = None,
    longest_wait: float = 15.0,
) -> T:
    """`call` (an activity), scheduled again while it reaches workers that must not run it (WrongWorker: they lack
    the projection, or have other code for it). The first few times at once (in a rolling deploy another worker
    of the right code is usually polling too), then after 1 s, doubling to `longest_wait`, each time telling
    `waiting` why. After `patience` of that (None: never), the run fails with error type NoWorker, naming the last
    worker met and why."""
    since: datetime | None = None
    refused = 0
    delay = 1.0
    while True:
        try:
            return await call()
        except ActivityError as error:
            cause = error.cause
            if not (isinstance(cause, ApplicationError) and cause.type == WRONG_WORKER):
                raise
            since = since or workflow.now()
            if patience is not None and workflow.now() - since >= patience:
                raise ApplicationError(
                    f"no worker could run it for {patience.total_seconds():.0f} s; the last one: {cause.message}",
                    type=NO_WORKER,
                    non_retryable=True,
                ) from None
            if waiting is not None:
                waiting(cause.message)
            refused += 1
            if refused <= _AT_ONCE:
                continue
            await workflow.sleep(timedelta(seconds=delay))
            delay = min(delay * 2, longest_wait)
