"""The tail workflow: one per projection, keeps its active read model current as new events commit."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from rehydrate.activities.tail import TailActivities
    from rehydrate.models import TailInput, TailRun, TailStatus
    from rehydrate.models.names import TAIL, tail_task_queue
    from rehydrate.workflows._common import INPUT_ERRORS, expect, failure_message, served

# A tail retries sooner than a replay's activities: its read model falls behind while it waits.
_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(seconds=15)
)


@workflow.defn(name=TAIL, failure_exception_types=INPUT_ERRORS)
class TailWorkflow:
    """Runs the tail activity again and again; any worker can run it, a crashed one is replaced after the
    heartbeat timeout. Start it with `{"projection": NAME}`; cancel it to stop the tail."""

    def __init__(self) -> None:
        self._input: TailInput | None = None
        self._generation: int | None = None
        self._checkpoint: int | None = None
        self._runs = 0

    @workflow.run
    async def run(self, input: TailInput) -> None:
        input = expect(input, TailInput, '{"projection": NAME}')
        self._input = input
        while True:
            self._show()
            try:
                # A worker that does not serve the projection hands the tail back; it waits for one that does.
                run = await served(
                    self._run_activity, patience=None, waiting=self._waiting_for_a_worker, longest_wait=60.0
                )
            except ActivityError as error:
                if is_cancelled_exception(error):
                    raise
                raise ApplicationError(failure_message(error), type="TailStopped", non_retryable=True) from None
            self._runs += 1
            input = replace(
                input, events_applied=input.events_applied + run.events_applied, batches=input.batches + run.batches
            )
            self._input = input
            self._generation = run.generation if run.generation is not None else self._generation
            self._checkpoint = run.checkpoint if run.checkpoint is not None else self._checkpoint
            if workflow.info().is_target_worker_deployment_version_changed():
                # Worker Versioning: a new build is current. Between two runs of the activity is a clean boundary:
                # the next run starts on the new build, and the projection shows STALE until a replay with its code.
                workflow.continue_as_new(
                    input, initial_versioning_behavior=workflow.ContinueAsNewVersioningBehavior.AUTO_UPGRADE
                )
            if workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(input)

    async def _run_activity(self) -> TailRun:
        """One run of the tail's activity, on the tails' task queue."""
        assert self._input is not None
        input = self._input
        return await workflow.execute_activity_method(
            TailActivities.run_tail,
            input,
            task_queue=tail_task_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(seconds=input.run_seconds + 120),
            heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
            retry_policy=_RETRY,
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"tail {input.projection} from checkpoint {self._checkpoint}",
        )

    def _waiting_for_a_worker(self, why: str) -> None:
        projection = self._input.projection if self._input else ""
        workflow.set_current_details(f"Tail of **{projection}**: waiting for a worker that serves it — {why}")

    def _show(self) -> None:
        status = self.status()
        workflow.set_current_details(
            f"Tail of **{status.projection}**: generation {status.generation}, checkpoint {status.checkpoint}, "
            f"{status.events_applied:,} events applied in {status.batches:,} batches"
        )

    @workflow.query
    def status(self) -> TailStatus:
        input = self._input
        return TailStatus(
            projection=input.projection if input else "",
            events_applied=input.events_applied if input else 0,
            batches=input.batches if input else 0,
            generation=self._generation,
            checkpoint=self._checkpoint,
            runs=self._runs,
        )
