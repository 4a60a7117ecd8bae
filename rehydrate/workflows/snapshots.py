"""The bulk snapshot rebuild workflow: plan partitions, then snapshot each partition's streams chunk by chunk."""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from rehydrate.activities.snapshots import SnapshotActivities
    from rehydrate.models import (
        PartitionState,
        SnapshotChunkInput,
        SnapshotPlanInput,
        SnapshotRebuildInput,
        SnapshotRebuildProgress,
        SnapshotRebuildResult,
        SnapshotRebuildState,
    )
    from rehydrate.models.names import SNAPSHOT_REBUILD
    from rehydrate.workflows._common import (
        INPUT_ERRORS,
        RETRY,
        execute_chunk,
        expect,
        failure_message,
        raise_if_cancel_requested,
        run_all,
    )


@workflow.defn(name=SNAPSHOT_REBUILD, failure_exception_types=INPUT_ERRORS)
class SnapshotRebuildWorkflow:
    """Rewrites the snapshot of every stream of one aggregate type. Start it with `{"aggregate_type": NAME}`.

    Partitions (hash of the stream id) run in parallel; inside one, chunks of streams run in keyset order, each
    committing its snapshots with the partition's cursor. Cancel it at any time: the snapshots written stay valid.
    """

    def __init__(self) -> None:
        self._input: SnapshotRebuildInput | None = None
        self._state: SnapshotRebuildState | None = None
        self._phase = "planning"
        self._stop_for_continue = False

    @workflow.run
    async def run(self, input: SnapshotRebuildInput) -> SnapshotRebuildResult:
        input = expect(input, SnapshotRebuildInput, '{"aggregate_type": NAME}')
        self._input = input
        state = input.state
        try:
            if state is None:
                state = await self._plan(input)
            else:
                state.runs += 1
            self._state = state
            self._phase = "building"
            self._show()
            if not await self._build(input, state):
                workflow.continue_as_new(SnapshotRebuildInput(**{**vars(input), "state": state}))
        except ActivityError as error:
            if is_cancelled_exception(error):
                self._phase = "cancelled"  # ends CANCELED; the snapshots written so far stay valid
                raise
            self._phase = "failed"
            raise ApplicationError(failure_message(error), type="SnapshotRebuildFailed", non_retryable=True) from None
        self._phase = "done"
        streams = sum(p.streams_done for p in state.partitions)
        seconds = self._elapsed(state)
        workflow.set_current_details(f"**{input.aggregate_type}**: {streams:,} snapshots in {seconds:.1f} s")
        return SnapshotRebuildResult(
            aggregate_type=input.aggregate_type,
            rebuild_id=state.rebuild_id,
            streams=streams,
            seconds=seconds,
            streams_per_second=streams / seconds if seconds > 0 else 0.0,
            runs=state.runs,
        )

    async def _plan(self, input: SnapshotRebuildInput) -> SnapshotRebuildState:
        rebuild_id = workflow.info().run_id
        plan = await workflow.execute_activity_method(
            SnapshotActivities.plan_snapshots,
            SnapshotPlanInput(input.aggregate_type, rebuild_id, input.partitions),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RETRY,
            summary=f"plan snapshots of {input.aggregate_type}",
        )
        return SnapshotRebuildState(
            rebuild_id=rebuild_id,
            partitions=plan.partitions,
            streams_total=plan.streams_total,
            chunk_size=max(input.chunk_size, 1),
            started_at=workflow.now().isoformat(),
        )

    async def _build(self, input: SnapshotRebuildInput, state: SnapshotRebuildState) -> bool:
        """Run every partition's chunks in order, partitions in parallel; False when continue-as-new is due."""
        heartbeat = timedelta(seconds=input.heartbeat_timeout_seconds)

        async def run_partition(partition: PartitionState) -> None:
            while not partition.done and not self._stop_for_continue:
                if workflow.cancellation_reason() is not None:
                    self._phase = "cancelled"
                raise_if_cancel_requested()
                result = await execute_chunk(
                    SnapshotActivities.snapshot_chunk,
                    SnapshotChunkInput(
                        aggregate_type=input.aggregate_type,
                        rebuild_id=state.rebuild_id,
                        partition=partition.partition,
                        partitions=len(state.partitions),
                        chunk_size=state.chunk_size,
                    ),
                    heartbeat=heartbeat,
                    start_to_close=timedelta(hours=1),
                    summary=f"partition {partition.partition} after {partition.after_stream or 'the start'}",
                )
                partition.after_stream = result.after_stream
                partition.streams_done = result.streams_done
                partition.done = result.done
                state.chunks_done += 1
                self._show()
                if workflow.info().is_continue_as_new_suggested():
                    self._stop_for_continue = True

        await run_all(run_partition(p) for p in state.partitions if not p.done)
        return all(p.done for p in state.partitions)

    def _elapsed(self, state: SnapshotRebuildState) -> float:
        return max((workflow.now() - datetime.fromisoformat(state.started_at)).total_seconds(), 0.0)

    def _show(self) -> None:
        p = self.progress()
        workflow.set_current_details(
            f"**{p.aggregate_type}** snapshots, phase **{p.phase}**: {p.streams_done:,} of {p.streams_total:,} "
            f"streams, {p.rate:,.0f} streams/s"
        )

    @workflow.query
    def progress(self) -> SnapshotRebuildProgress:
        """Phase, streams snapshotted of total, per-partition cursor, rate and ETA."""
        aggregate_type = self._input.aggregate_type if self._input else ""
        state = self._state
        if state is None:
            return SnapshotRebuildProgress(aggregate_type, self._phase)
        done = sum(p.streams_done for p in state.partitions)
        elapsed = self._elapsed(state)
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = max(state.streams_total - done, 0)
        return SnapshotRebuildProgress(
            aggregate_type=aggregate_type,
            phase=self._phase,
            streams_done=done,
            streams_total=state.streams_total,
            partitions=state.partitions,
            elapsed_seconds=elapsed,
            rate=rate,
            eta_seconds=remaining / rate if rate > 0 else None,
            runs=state.runs,
        )
