"""The verify workflow: rebuild a projection into a sandbox at the live checkpoint, compare key by key, drop it."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from rehydrate.activities.verify import VerifyActivities
    from rehydrate.core import search_attributes
    from rehydrate.models import (
        ReplayInput,
        VerifyCompareInput,
        VerifyInput,
        VerifyResult,
        VerifyStartInput,
    )
    from rehydrate.models.names import DRIFT, VERIFY, replay_workflow_id, verify_label
    from rehydrate.workflows._common import INPUT_ERRORS, RETRY, expect, failure_message, served
    from rehydrate.workflows.messages import clean_message, drift_message
    from rehydrate.workflows.replay import ReplayWorkflow


@workflow.defn(name=VERIFY, failure_exception_types=INPUT_ERRORS)
class VerifyWorkflow:
    """Verifies one projection against a fresh rebuild. Start it with `{"projection": NAME}`.

    Completes with the result when the live generation equals the rebuild; ends FAILED with error type "Drift"
    (non-retryable, the result as its details) when keys differ, so that drift shows as a failed run in the UI,
    in a schedule's recent runs, in `ExecutionStatus = "Failed"` queries and in the SDK's workflow-failed metric.
    """

    def __init__(self) -> None:
        self._projection = ""
        self._phase = "starting"
        self._search_attributes = False

    @workflow.run
    async def run(self, input: VerifyInput) -> VerifyResult:
        input = expect(input, VerifyInput, '{"projection": NAME}')
        self._projection = input.projection
        started = workflow.now()
        label = verify_label(input.projection)
        workflow.set_current_details(f"Verifying **{input.projection}**: reading the live checkpoint")
        try:
            start = await served(
                lambda: workflow.execute_activity_method(
                    VerifyActivities.verify_start,
                    VerifyStartInput(input.projection, skip_if_running=input.skip_if_running, show=input.show),
                    start_to_close_timeout=timedelta(minutes=5),
                    retry_policy=RETRY,
                    summary=f"live checkpoint of {input.projection}",
                ),
                patience=timedelta(seconds=input.wrong_worker_patience_seconds),
            )
        except (ActivityError, ApplicationError) as error:
            raise ApplicationError(failure_message(error), type="VerifyFailed", non_retryable=True) from None
        self._search_attributes = start.search_attributes
        if start.running_elsewhere is not None:
            return self._skip(
                input,
                f"skipped: {input.projection} is being rebuilt by {start.running_elsewhere}; "
                "the next verify checks the generation it swaps in",
            )

        self._show(
            "rebuilding",
            f"**{input.projection}**: rebuilding into sandbox {label} at mark {start.mark} "
            f"(the checkpoint of live generation {start.live_generation})",
        )
        # The child's id is the sandbox build's fixed id on this task queue: one verify per projection at a time,
        # however started. The start activity names it (a worker knows its queue), so the history records it.
        rebuild_id = start.rebuild_workflow_id or replay_workflow_id(input.projection, label)
        try:
            rebuild = await workflow.start_child_workflow(
                ReplayWorkflow.run,
                ReplayInput(
                    input.projection,
                    lanes=input.lanes,
                    chunk_size=input.chunk_size,
                    max_parallel=input.max_parallel,
                    sandbox=label,
                    mark=start.mark,
                    wrong_worker_patience_seconds=input.wrong_worker_patience_seconds,
                ),
                id=rebuild_id,
                # Terminated or timed out, this run still lets its rebuild drop its half-built generation.
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                static_summary=f"Verify rebuild of {input.projection} at mark {start.mark}",
            )
        except WorkflowAlreadyStartedError:
            reason = f"a verify of {input.projection} is already running (its rebuild is workflow {rebuild_id})"
            if input.skip_if_running:
                return self._skip(input, f"skipped: {reason}")
            raise ApplicationError(reason, type="VerifyFailed", non_retryable=True) from None

        try:
            built = await rebuild
            self._show(
                "comparing",
                f"**{input.projection}**: comparing generation {start.live_generation} with the rebuild "
                f"(generation {built.generation}), under the tail lock",
            )
            result = await served(
                lambda: workflow.execute_activity_method(
                    VerifyActivities.verify_compare,
                    VerifyCompareInput(input.projection, label, built.generation, input.show),
                    start_to_close_timeout=timedelta(hours=2),
                    retry_policy=RETRY,
                    summary=f"compare {input.projection} g{start.live_generation} with the rebuild g{built.generation}",
                ),
                patience=timedelta(seconds=input.wrong_worker_patience_seconds),
            )
        except BaseException as error:
            cancelled = is_cancelled_exception(error)
            message = "cancelled" if cancelled else f"failed: {failure_message(error)}"
            self._show("cancelled" if cancelled else "failed", f"**{input.projection}**: verify {message}")
            if not input.keep:
                await self._drop(label, quietly=True)
            if cancelled or not isinstance(error, (ActivityError, ChildWorkflowError)):
                raise
            raise ApplicationError(
                f"verify of {input.projection} failed: {failure_message(error)}",
                type="VerifyFailed",
                non_retryable=True,
            ) from None

        if not input.keep:
            await self._drop(label)
        result.sandbox = label if input.keep else None
        result.seconds = max((workflow.now() - started).total_seconds(), 0.0)
        if result.differing:
            message = drift_message(result)
            self._show("drift", message)
            raise ApplicationError(message, result, type=DRIFT, non_retryable=True)
        self._show("clean", clean_message(result))
        return result

    def _skip(self, input: VerifyInput, reason: str) -> VerifyResult:
        """A scheduled run that found a replay or another verify of the projection: succeed, saying so."""
        self._show("skipped", f"**{input.projection}**: {reason}")
        return VerifyResult(input.projection, 0, 0, 0, 0, 0, 0, skipped=reason)

    async def _drop(self, label: str, *, quietly: bool = False) -> None:
        try:
            await workflow.execute_activity_method(
                VerifyActivities.drop_verify_sandbox,
                label,
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=RETRY,
                summary=f"drop sandbox {label}",
            )
        except ActivityError:
            if not quietly:
                raise
            # Cleaning up after a failure: the failure is what the run reports, not the cleanup's.
            workflow.logger.warning("could not drop sandbox %s after a failed verify", label)

    def _show(self, phase: str, details: str) -> None:
        """The phase as a search attribute (when registered) and the one-line state as current details."""
        self._phase = phase
        if self._search_attributes:
            workflow.upsert_search_attributes(
                [search_attributes.PROJECTION.value_set(self._projection), search_attributes.PHASE.value_set(phase)]
            )
        workflow.set_current_details(details)

    @workflow.query(description="The verify's phase: starting, rebuilding, comparing, clean, drift, skipped, failed.")
    def phase(self) -> str:
        return self._phase
