"""The repair workflow: rebuild the rows of selected keys of a projection's live read model, a batch at a time."""

from __future__ import annotations

import functools
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from rehydrate.activities.repair import RepairActivities
    from rehydrate.models import RepairBatchInput, RepairInput, RepairResult
    from rehydrate.models.names import REPAIR
    from rehydrate.workflows._common import INPUT_ERRORS, RETRY, expect, failure_message, served
    from rehydrate.workflows.messages import repair_message

REPAIR_FAILED = "RepairFailed"


@workflow.defn(name=REPAIR, failure_exception_types=INPUT_ERRORS)
class RepairWorkflow:
    """Rebuilds the rows of `keys` in the live generation from their whole history, `batch_size` keys per
    transaction, coordinated with the tail (each batch holds the projection's lock). Start it with
    `{"projection": NAME, "keys": [KEY, …]}`; `"dry_run": true` changes nothing and says what would change."""

    @workflow.run
    async def run(self, input: RepairInput) -> RepairResult:
        input = expect(input, RepairInput, '{"projection": NAME, "keys": [KEY, ...]}')
        keys = sorted(set(input.keys))
        if not keys:
            raise ApplicationError("no key to repair: give keys", type=REPAIR_FAILED, non_retryable=True)
        if input.batch_size < 1:
            raise ApplicationError(
                f"batch_size={input.batch_size} is not positive", type=REPAIR_FAILED, non_retryable=True
            )
        total = RepairResult(input.projection, dry_run=input.dry_run)
        for start in range(0, len(keys), input.batch_size):
            batch = keys[start : start + input.batch_size]
            workflow.set_current_details(
                f"**{input.projection}**: repairing keys {start + 1:,}–{start + len(batch):,} of {len(keys):,}"
            )
            try:
                done = await served(
                    functools.partial(self._repair, input, batch),
                    patience=timedelta(seconds=input.wrong_worker_patience_seconds),
                )
            except (ActivityError, ApplicationError) as error:
                raise ApplicationError(failure_message(error), type=REPAIR_FAILED, non_retryable=True) from None
            total.generation = done.generation
            total.keys += done.keys
            total.changed += done.changed
            total.events += done.events
            total.first = (total.first + done.first)[: input.show]
            total.stale = total.stale or done.stale
            total.batches += 1
        workflow.set_current_details(repair_message(total))
        return total

    async def _repair(self, input: RepairInput, batch: list[str]) -> RepairResult:
        return await workflow.execute_activity_method(
            RepairActivities.repair_keys,
            RepairBatchInput(input.projection, batch, input.dry_run, input.show),
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RETRY,
            summary=f"repair {len(batch)} key(s) of {input.projection}",
        )
