"""The replay workflow: plan, build lanes × chunks in a bounded window, finish, catch up, swap."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityHandle

with workflow.unsafe.imports_passed_through():
    from rehydrate.activities.replay import ReplayActivities
    from rehydrate.core import search_attributes
    from rehydrate.core.limits import MAX_PARALLEL, check_rate
    from rehydrate.models import (
        CatchUpInput,
        ChunkInput,
        GenerationRef,
        LaneState,
        PlanInput,
        ReplayInput,
        ReplayProgress,
        ReplayResult,
        ReplayState,
        SwapResult,
    )
    from rehydrate.models.names import OWN_SOURCE, REPLAY, REPLAY_PHASES
    from rehydrate.models.replay import Plan
    from rehydrate.workflows._common import (
        INPUT_ERRORS,
        NO_WORKER,
        RETRY,
        execute_chunk,
        expect,
        failure_message,
        raise_if_cancel_requested,
        run_all,
        served,
    )

# Replays started by an earlier version upserted their progress after every chunk; they still do when replayed.
_PROGRESS_EVERY_SECOND = "progress-upserted-at-most-every-second"
# They also ran ANALYZE before the catch-up and swap (finish_tables), and still do when replayed.
_ANALYZE_BESIDE_SWAP = "analyze-beside-catch-up-and-swap"
# And then swapped as soon as they had caught up, while ANALYZE could still be running; they still do when replayed.
_ANALYZED_BEFORE_SWAP = "swap-after-analyze"
# Under max_rate, a chunk holds about this many seconds of events at the rate, and applies them over that time.
_THROTTLED_CHUNK_SECONDS = 2.0
# Replays started before throttled chunks paced themselves ran chunks of a second's events at full speed, and gave
# no turn's time back for a lane's last, short chunk; they still do when replayed.
_PACED_CHUNKS = "throttled-chunks-paced-inside"
_UNPACED_CHUNK_SECONDS = 1.0
# Replays started before runs carried their projection in the memo (where `replay status|list` find them,
# whatever their workflow id) do not write it when replayed.
_MEMO = "memo-names-the-projection"
_MAX_CATCH_UP_ROUNDS = 20
T = TypeVar("T")


@workflow.defn(name=REPLAY, failure_exception_types=INPUT_ERRORS)
class ReplayWorkflow:
    """Rebuilds one projection into a new generation and swaps it in. Start it with `{"projection": NAME}`."""

    def __init__(self) -> None:
        self._input: ReplayInput | None = None
        self._state: ReplayState | None = None
        self._phase = "planning"
        self._caught_up = 0
        self._stop_for_continue = False
        self._paused = False
        self._paused_since: datetime | None = None  # when the current pause began (workflow time)
        self._running = 0  # chunk activities started and not yet finished: at most state.max_parallel
        self._next_chunk_at = 0.0  # under max_rate: when (workflow time) the next chunk may start
        self._shown: tuple[str, int] | None = None  # the phase and percent last upserted as search attributes
        self._shown_at: datetime | None = None  # when (workflow time)

    @workflow.run
    async def run(self, input: ReplayInput) -> ReplayResult:
        input = expect(input, ReplayInput, '{"projection": NAME}')
        self._input = input
        self._name_in_memo(input)
        state = input.state
        if state is None:
            workflow.set_current_details(f"Planning a replay of **{input.projection}**")
            plan = await self._plan(input)
            if plan.running_elsewhere is not None:
                return self._skip(input, plan)
            state = self._start_state(plan)
        else:
            state.runs += 1
            self._paused = self._paused or state.paused
        self._state = state
        self._paused_since = workflow.now() if self._paused else None  # the pause is counted from the state's start
        self._phase = state.phase
        self._mark()
        try:
            if state.phase == "building":
                self._show()
                if not await self._build(input, state):
                    state.paused = self._paused
                    state.paused_seconds = self._paused_for(state)
                    self._mark()  # the closing run keeps the progress it reached
                    workflow.continue_as_new(ReplayInput(**{**vars(input), "state": state}))
                state.phase = "finishing"
            return await self._finish(input, state)
        except BaseException as error:
            if is_cancelled_exception(error):
                # Raising the cancellation again ends the run as CANCELED (not FAILED) in Temporal.
                self._phase = "cancelled"
                self._mark()
                await self._drop(state, "cancelled")
                raise
            if not isinstance(error, ActivityError) and not (
                isinstance(error, ApplicationError) and error.type == NO_WORKER
            ):
                raise
            self._phase = "failed"
            self._mark()
            message = failure_message(error)
            await self._drop(state, message)
            raise ApplicationError(message, type="ReplayFailed", non_retryable=True) from None

    def _name_in_memo(self, input: ReplayInput) -> None:
        """The projection (and sandbox) in the run's memo, so that the CLI finds this run in Temporal's list
        whoever started it (the CLI, a schedule, the Web UI, a program) and under whatever workflow id."""
        if "projection" in workflow.memo() or not workflow.patched(_MEMO):
            return
        workflow.upsert_memo({"projection": input.projection, "sandbox": input.sandbox})

    async def _plan(self, input: ReplayInput) -> Plan:
        info = workflow.info()
        try:
            plan = await self._served(
                lambda: workflow.execute_activity_method(
                    ReplayActivities.plan_replay,
                    PlanInput(
                        projection=input.projection,
                        workflow_id=info.workflow_id,
                        run_id=info.run_id,
                        lanes=input.lanes,
                        chunk_size=input.chunk_size,
                        max_parallel=input.max_parallel,
                        skip_if_running=input.skip_if_running,
                        sandbox=input.sandbox,
                        to_position=input.to_position,
                        as_of=input.as_of,
                        mark=input.mark,
                        accept_partial_history=input.accept_partial_history,
                    ),
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
                    retry_policy=RETRY,
                    summary=f"plan {input.projection}",
                )
            )
        except ActivityError as error:
            raise ApplicationError(failure_message(error), type="ReplayFailed", non_retryable=True) from None
        return plan

    def _start_state(self, plan: Plan) -> ReplayState:
        return ReplayState(
            generation=plan.generation,
            physical_table=plan.physical_table,
            mark=plan.mark,
            lanes=plan.lanes,
            chunk_size=plan.chunk_size,
            max_parallel=plan.max_parallel,
            events_total=plan.events_total,
            started_at=workflow.now().isoformat(),
            search_attributes=plan.search_attributes,
            source=plan.source,
            tables=plan.tables,
            max_rate=self._input.max_rate if self._input else None,
        )

    def _skip(self, input: ReplayInput, plan: Plan) -> ReplayResult:
        """A scheduled run that found another replay building: succeed, saying so (the schedule shows it)."""
        reason = f"skipped: {input.projection} is already being rebuilt by {plan.running_elsewhere}"
        self._phase = "skipped"
        if plan.search_attributes:
            workflow.upsert_search_attributes(
                [search_attributes.PROJECTION.value_set(input.projection), search_attributes.PHASE.value_set("skipped")]
            )
        workflow.set_current_details(f"**{input.projection}**: {reason}")
        return ReplayResult(input.projection, 0, None, 0, 0, 0, 0.0, 0.0, 0.0, 1, skipped=reason)

    async def _build(self, input: ReplayInput, state: ReplayState) -> bool:
        """Run every lane's chunks in order, lanes in parallel, at most `max_parallel` chunks at once.

        Returns False when Temporal suggests continue-as-new: each lane stops after its current chunk.
        """
        heartbeat = timedelta(seconds=input.heartbeat_timeout_seconds)

        def may_start() -> bool:
            # The window is workflow state, not a semaphore: `set_max_parallel` may move it while lanes wait, and
            # every replay of the history re-evaluates this condition on the same signals in the same order.
            return self._stop_for_continue or (not self._paused and self._running < state.max_parallel)

        def parents_done(lane: LaneState) -> bool:
            return self._stop_for_continue or all(state.lanes[parent].done for parent in lane.after)

        async def run_lane(lane: LaneState) -> None:
            if lane.after and not lane.done:
                # A partition's parents hold its keys' earlier records: the lane starts once they are read to their
                # end. Only plans that record parents take this path, so replays in flight replay the same commands.
                await workflow.wait_condition(functools.partial(parents_done, lane))
            while not lane.done and not self._stop_for_continue:
                chunk_size, rate = state.chunk_size, None
                if state.max_rate:
                    chunk_size, rate = await self._pace(state)
                # Waiters released in the same pass all saw the same free slot: the first to resume takes it,
                # the others check again (no await between the check and the increment).
                while not may_start():
                    await workflow.wait_condition(may_start)
                if self._stop_for_continue:
                    return
                raise_if_cancel_requested()
                self._running += 1
                chunk = ChunkInput(
                    projection=input.projection,
                    generation=state.generation,
                    lane=lane.lane,
                    lanes=len(state.lanes),
                    mark=state.mark,
                    chunk_size=chunk_size,
                    max_rate=rate,
                )
                try:
                    result = await self._served(
                        functools.partial(
                            execute_chunk,
                            ReplayActivities.apply_chunk,
                            chunk,
                            heartbeat=heartbeat,
                            start_to_close=timedelta(hours=2),
                            summary=f"lane {lane.lane} after position {lane.position}",
                        )
                    )
                finally:
                    self._running -= 1
                lane.position = result.position
                lane.applied = result.applied
                lane.done = result.done
                if rate is not None and lane.done and state.max_rate == rate:
                    # A lane's last chunk is short: the time its turn held for the events it did not have goes back.
                    self._next_chunk_at -= max(0, chunk_size - result.chunk_events) / rate
                if lane.done:  # the plan's total was estimated from a sample: now it is known
                    state.events_total += lane.applied - lane.total
                    lane.total = lane.applied
                state.chunks_done += 1
                self._show(throttle=not self._paused)
                if workflow.info().is_continue_as_new_suggested():
                    self._stop_for_continue = True

        await run_all(run_lane(lane) for lane in state.lanes if not lane.done)
        return all(lane.done for lane in state.lanes)

    async def _pace(self, state: ReplayState) -> tuple[int, float | None]:
        """Under `max_rate`, wait for the next chunk's turn and return its size and rate: chunks of about two
        seconds' events, their turns handed out in order over all lanes, one chunk's worth of time apart at the rate;
        each chunk spreads its own fetches over that time (build.Pace), so that the database sees an even trickle, not
        bursts. A rate changed while a lane waits takes effect at once; a rate removed ends the wait."""
        paced = workflow.patched(_PACED_CHUNKS)
        seconds = _THROTTLED_CHUNK_SECONDS if paced else _UNPACED_CHUNK_SECONDS
        while state.max_rate:
            rate = state.max_rate
            size = max(1, min(state.chunk_size, int(rate * seconds)))
            now = workflow.time()
            turn = max(now, self._next_chunk_at)
            self._next_chunk_at = turn + size / rate  # taken before waiting: lanes get turns in the order they ask
            if turn <= now:
                return size, rate if paced else None
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(functools.partial(_changed, state, rate), timeout=turn - now)
            if state.max_rate == rate:
                return size, rate if paced else None
            self._next_chunk_at = workflow.time()  # a new rate hands out turns afresh
        return state.chunk_size, None

    async def _finish(self, input: ReplayInput, state: ReplayState) -> ReplayResult:
        ref = GenerationRef(input.projection, state.generation)
        await workflow.wait_condition(lambda: not self._paused)
        raise_if_cancel_requested()
        self._phase = "indexing"
        self._show()
        # Replays started before ANALYZE ran beside the catch-up and swap still run finish_tables (indexes and
        # ANALYZE), as sandbox builds do (they have no catch-up or swap to run it beside).
        beside = not input.sandbox and workflow.patched(_ANALYZE_BESIDE_SWAP)
        built_rows = await self._served(
            lambda: workflow.execute_activity_method(
                ReplayActivities.index_tables if beside else ReplayActivities.finish_tables,
                ref,
                start_to_close_timeout=timedelta(hours=2),
                heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
                retry_policy=RETRY,
                summary=f"indexes {'' if beside else 'and ANALYZE '}of {state.physical_table}",
            )
        )
        # ANALYZE blocks neither the catch-up's writes nor the swap (which locks the view, not the table): it
        # runs beside the catch-up, and the swap waits for it (see `_catch_up_and_swap`).
        analyzing: ActivityHandle[None] | None = None
        if beside:
            analyzing = workflow.start_activity_method(
                ReplayActivities.analyze_table,
                ref,
                start_to_close_timeout=timedelta(hours=2),
                heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
                retry_policy=RETRY,
                summary=f"ANALYZE {state.physical_table}",
            )
        if input.sandbox:
            return await self._publish_sandbox(input, state, ref, built_rows)
        try:
            swapped = await self._catch_up_and_swap(input, state, analyzing)
            if analyzing is not None:
                await analyzing
        except BaseException:
            if analyzing is not None and not analyzing.done():
                analyzing.cancel()
            raise
        self._caught_up += swapped.final_delta
        self._phase = "done"
        self._mark()
        seconds = self._elapsed(state)
        running = seconds - self._paused_for(state)
        applied = sum(lane.applied for lane in state.lanes) + self._caught_up
        workflow.set_current_details(
            f"**{input.projection}**: generation {state.generation} active, {applied:,} events applied "
            f"in {seconds:.1f} s, {swapped.rows:,} rows"
        )
        return ReplayResult(
            projection=input.projection,
            generation=state.generation,
            previous_generation=swapped.previous_generation,
            events_applied=applied,
            caught_up=self._caught_up,
            rows=swapped.rows,
            seconds=seconds,
            events_per_second=applied / running if running > 0 else 0.0,
            swap_lock_ms=swapped.lock_ms,
            runs=state.runs,
        )

    async def _catch_up_and_swap(
        self, input: ReplayInput, state: ReplayState, analyzing: ActivityHandle[None] | None = None
    ) -> SwapResult:
        """Catch up in rounds until few events are left, then, once `analyzing` is done, swap (the swap applies the
        rest under its lock)."""
        self._phase = "catching_up"
        for _ in range(_MAX_CATCH_UP_ROUNDS):
            raise_if_cancel_requested()
            self._show()
            caught = await self._served(
                lambda: workflow.execute_activity_method(
                    ReplayActivities.catch_up,
                    CatchUpInput(input.projection, state.generation),
                    start_to_close_timeout=timedelta(hours=1),
                    heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
                    retry_policy=RETRY,
                    summary="catch up with events appended since the target",
                )
            )
            self._caught_up += caught.applied
            if caught.applied < input.catch_up_threshold:
                break
        if analyzing is not None and workflow.patched(_ANALYZED_BEFORE_SWAP):
            # Readers' queries are planned from the tables' statistics: on a table without them, a join of the
            # orders with their lines scanned every line instead of using the index (53 ms instead of 0.1 here).
            # What arrives meanwhile, the swap applies under its lock.
            await analyzing
        raise_if_cancel_requested()
        self._phase = "swapping"
        self._show()
        return await self._served(
            lambda: workflow.execute_activity_method(
                ReplayActivities.swap,
                GenerationRef(input.projection, state.generation, allow_dead_letters=input.allow_dead_letters),
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=timedelta(seconds=max(input.heartbeat_timeout_seconds, 30)),
                retry_policy=RETRY,
                summary=f"swap {input.projection} to generation {state.generation}",
            )
        )

    async def _publish_sandbox(
        self, input: ReplayInput, state: ReplayState, ref: GenerationRef, rows: int
    ) -> ReplayResult:
        """A sandbox build ends here: no catch-up (it is the read model at its target), no swap of the live view."""
        parked = await self._served(
            lambda: workflow.execute_activity_method(
                ReplayActivities.publish_sandbox,
                ref,
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=timedelta(seconds=input.heartbeat_timeout_seconds),
                retry_policy=RETRY,
                summary=f"publish sandbox {input.sandbox}",
            )
        )
        self._phase = "done"
        self._mark()
        seconds = self._elapsed(state)
        running = seconds - self._paused_for(state)
        applied = sum(lane.applied for lane in state.lanes)
        workflow.set_current_details(
            f"**{input.projection}**: sandbox {input.sandbox} built (generation {state.generation}), "
            f"{applied:,} events, {rows:,} rows, {parked:,} parked; nothing swapped"
        )
        return ReplayResult(
            projection=input.projection,
            generation=state.generation,
            previous_generation=None,
            events_applied=applied,
            caught_up=0,
            rows=rows,
            seconds=seconds,
            events_per_second=applied / running if running > 0 else 0.0,
            swap_lock_ms=0.0,
            runs=state.runs,
            sandbox=input.sandbox,
            dead_letters=parked,
        )

    async def _served(self, call: Callable[[], Awaitable[T]]) -> T:
        """An activity call, scheduled again while it reaches workers that must not run it (see `served`)."""
        patience = timedelta(seconds=self._input.wrong_worker_patience_seconds if self._input else 300.0)
        return await served(call, patience=patience, waiting=self._waiting_for_a_worker)

    def _waiting_for_a_worker(self, why: str) -> None:
        projection = self._input.projection if self._input else ""
        workflow.set_current_details(f"**{projection}**: waiting for a worker that can run the next step — {why}")

    async def _drop(self, state: ReplayState, reason: str) -> None:
        await workflow.execute_activity_method(
            ReplayActivities.drop_generation,
            GenerationRef(self._input.projection if self._input else "", state.generation, reason),
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RETRY,
            summary=f"drop generation {state.generation}",
        )

    def _elapsed(self, state: ReplayState) -> float:
        started = datetime.fromisoformat(state.started_at)
        return max((workflow.now() - started).total_seconds(), 0.0)

    def _paused_for(self, state: ReplayState) -> float:
        """Seconds spent paused so far, the pause going on included."""
        ongoing = (workflow.now() - self._paused_since).total_seconds() if self._paused_since else 0.0
        return state.paused_seconds + max(ongoing, 0.0)

    def _mark(self, throttle: bool = False) -> None:
        """Upsert phase and progress as search attributes (when registered) and set the phase gauge.

        Only on a change, so the history grows by at most about a hundred upserts per run; the first call of a
        run always upserts, so a run after continue-as-new carries them whatever the server copied. With
        `throttle` (a chunk done), progress is upserted at most once a second: each upsert is a history event and
        a write to the server's visibility store, and progress moves with every chunk (on a dev server, a replay
        of 1M events spent a quarter of the server's CPU on them and on the chunks' first heartbeats). Phases,
        pause and resume, and the end of a run upsert at once, so what the Web UI lists is never left behind.
        """
        state, projection = self._state, self._input.projection if self._input else ""
        if state is None:
            return
        applied = sum(lane.applied for lane in state.lanes)
        percent = (
            100 if self._phase == "done" else min(99, 100 * applied // state.events_total) if state.events_total else 0
        )
        if self._phase in REPLAY_PHASES:
            workflow.metric_meter().create_gauge(
                "rehydrate_replay_phase", "The phase of the running replay: index in REPLAY_PHASES (done = 6)"
            ).set(REPLAY_PHASES.index(self._phase), {"projection": projection})
        if not state.search_attributes or self._shown == (self._phase, percent):
            return
        now = workflow.now()
        recent = self._shown_at is not None and now - self._shown_at < timedelta(seconds=1)
        same_phase = self._shown is not None and self._shown[0] == self._phase
        if throttle and recent and same_phase and workflow.patched(_PROGRESS_EVERY_SECOND):
            return
        self._shown, self._shown_at = (self._phase, percent), now
        workflow.upsert_search_attributes(
            [
                search_attributes.PROJECTION.value_set(projection),
                search_attributes.PHASE.value_set(self._phase),
                search_attributes.PROGRESS.value_set(percent),
            ]
        )

    def _show(self, throttle: bool = False) -> None:
        """Current details in the Web UI; set again in every run because continue-as-new clears them."""
        self._mark(throttle)
        progress = self.progress()
        lanes = " · ".join(
            f"lane {lane.lane}: {lane.applied:,}/{lane.total:,}{' ✓' if lane.done else ''}" for lane in progress.lanes
        )
        source = "" if self._state is None or self._state.source == OWN_SOURCE else f" from source {self._state.source}"
        workflow.set_current_details(
            f"**{progress.projection}**{source} → generation {progress.generation}"
            f"{' (tables ' + ', '.join(progress.tables) + ')' if len(progress.tables) > 1 else ''}, "
            f"phase **{progress.phase}**"
            f"{' — **paused** (signal `resume` to go on)' if self._paused else ''}"
            f"{f' — throttled to {progress.max_rate:,.0f} events/s' if progress.max_rate else ''}"
            f"\n\n{progress.counts()}\n\n{lanes}"
        )

    @workflow.query(description="Phase, events applied of total, per-lane position, rate and ETA.")
    def progress(self) -> ReplayProgress:
        """Phase, events applied of total, per-lane position, rate and ETA."""
        projection = self._input.projection if self._input else ""
        state = self._state
        if state is None:
            return ReplayProgress(projection=projection, phase=self._phase)
        applied = sum(lane.applied for lane in state.lanes)
        elapsed = self._elapsed(state)
        paused = self._paused_for(state)
        running = elapsed - paused
        rate = applied / running if running > 0 else 0.0
        remaining = max(state.events_total - applied, 0)
        return ReplayProgress(
            projection=projection,
            phase=self._phase,
            generation=state.generation,
            events_applied=applied,
            events_total=state.events_total,
            caught_up=self._caught_up,
            lanes=state.lanes,
            started_at=state.started_at,
            elapsed_seconds=elapsed,
            paused_seconds=paused,
            rate=rate,
            eta_seconds=remaining / rate if rate > 0 and not self._paused else None,
            runs=state.runs,
            paused=self._paused,
            max_parallel=state.max_parallel,
            tables=state.tables,
            max_rate=state.max_rate,
        )

    @workflow.signal(name="pause", description="Pause after the running chunks; `resume` goes on.")
    def pause(self) -> None:
        """Stop starting chunks (running ones finish); the generation and its checkpoints stay. Undo: `resume`."""
        if not self._paused:
            self._paused, self._paused_since = True, workflow.now()
        if self._state is not None:
            self._show()

    @workflow.signal(name="resume", description="Resume a paused replay.")
    def resume(self) -> None:
        """Go on from where `pause` stopped."""
        if self._paused and self._state is not None and self._paused_since is not None:
            self._state.paused_seconds += max((workflow.now() - self._paused_since).total_seconds(), 0.0)
        self._paused, self._paused_since = False, None
        if self._state is not None:
            self._show()

    @workflow.update(name="set_max_parallel", description="Change how many chunks run at once, from the next chunk.")
    def set_max_parallel(self, max_parallel: int) -> int:
        """Move the build's window; running chunks finish, the next ones start under the new bound. Returns
        the previous bound. Carried across continue-as-new in the replay's state."""
        if self._state is None:
            raise ApplicationError("the replay is still planning", type="NotReady")
        previous = self._state.max_parallel
        self._state.max_parallel = max_parallel
        return previous

    @set_max_parallel.validator
    def _check_max_parallel(self, max_parallel: int) -> None:
        if not isinstance(max_parallel, int) or not 1 <= max_parallel <= MAX_PARALLEL:
            raise ValueError(f"max_parallel={max_parallel!r} is out of range: use 1..{MAX_PARALLEL}")

    @workflow.update(name="set_max_rate", description="Change the events per second the build may apply (null: none).")
    def set_max_rate(self, max_rate: float | None) -> float | None:
        """Throttle (or free) the build from its next chunk on; returns the previous limit. Carried across
        continue-as-new in the replay's state."""
        if self._state is None:
            raise ApplicationError("the replay is still planning", type="NotReady")
        previous = self._state.max_rate
        self._state.max_rate = max_rate
        self._show()
        return previous

    @set_max_rate.validator
    def _check_max_rate(self, max_rate: float | None) -> None:
        check_rate(max_rate)


def _changed(state: ReplayState, rate: float) -> bool:
    return state.max_rate != rate
