"""The replay's activities: plan, apply one chunk of a lane, index and analyze the tables, catch up, swap, drop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.service import RPCError

from rehydrate.activities._common import Activities, heartbeats, user_errors_fail_the_run
from rehydrate.activities.tail import ensure_tail
from rehydrate.core import logs, metrics, search_attributes, tracing
from rehydrate.core.settings import Settings
from rehydrate.engine import build
from rehydrate.engine.projections import Registry
from rehydrate.models import (
    CatchUpInput,
    CatchUpResult,
    ChunkInput,
    ChunkResult,
    GenerationRef,
    Plan,
    PlanInput,
    SwapResult,
)

log = logging.getLogger("rehydrate.activities")


async def search_attributes_registered() -> bool:
    """Whether a run may upsert its search attributes; False when it cannot tell (no client, no permission)."""
    try:
        return await search_attributes.registered(activity.client())
    except (RuntimeError, RPCError) as error:  # RuntimeError: an ActivityEnvironment without a client
        log.warning("search attributes not set on this run: cannot list them (%s)", error)
        return False


def _quiet_start() -> float:
    """Seconds a chunk runs before its first heartbeat. The SDK sends the first one at once (later ones at most
    every 0.8 heartbeat timeouts): a round trip and a server write per chunk that, for the usual chunk of well
    under a second, tell the server nothing its completion does not. A worker that dies mid-chunk is found as
    soon as before (the server's heartbeat clock starts with the attempt); a cancel reaches a chunk at its first
    heartbeat, so at most this much later: a quarter of the heartbeat timeout, at most one second."""
    timeout = activity.info().heartbeat_timeout
    return min(1.0, timeout.total_seconds() / 4) if timeout else 1.0


def _chunk() -> str:
    """A chunk's name in logs: its activity id, unique within the replay's run."""
    return activity.info().activity_id


class ReplayActivities(Activities):
    """The replay's activities, with the worker's projections."""

    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.registry = registry

    @activity.defn(name="rehydrate.plan_replay")
    @user_errors_fail_the_run
    @heartbeats
    async def plan_replay(self, input: PlanInput) -> Plan:
        """Take the high-water mark as the target, create the generation's table and its lane checkpoints."""
        projection = self.registry.get(input.projection)
        async with self.connection() as conn:
            plan = await build.plan_generation(conn, self.sources, self.settings, projection, input)
        if plan.running_elsewhere is None:
            plan.search_attributes = await search_attributes_registered()
        return plan

    @activity.defn(name="rehydrate.apply_chunk")
    @user_errors_fail_the_run
    async def apply_chunk(self, input: ChunkInput) -> ChunkResult:
        """Apply the next `chunk_size` events of one lane, with its checkpoint, in one transaction."""
        started = time.monotonic()
        with (
            logs.context(projection=input.projection, generation=input.generation, lane=input.lane, chunk=_chunk()),
            tracing.span(
                "chunk",
                projection=input.projection,
                generation=input.generation,
                lane=input.lane,
                chunk=_chunk(),
                chunk_size=input.chunk_size,
                mark=input.mark,
            ),
        ):
            projection = self.registry.get(input.projection)
            progress = build.ChunkProgress(
                heartbeat=activity.heartbeat, quiet_until=asyncio.get_running_loop().time() + _quiet_start()
            )
            async with self.connection() as conn:
                result = await build.apply_chunk(
                    conn, self.sources, self.settings.read_model_schema, projection, input, progress
                )
            tracing.annotate(
                from_position=progress.from_position,
                to_position=result.position,
                events_applied=result.chunk_events,
                lane_done=result.done,
            )
            seconds = time.monotonic() - started
            metrics.events_applied(input.projection, result.chunk_events)
            metrics.chunk_duration(input.projection, seconds)
            log.info(
                "chunk applied: %d events, lane at position %d, %.3f s", result.chunk_events, result.position, seconds
            )
        return result

    # -- finish, catch up, swap ----------------------------------------------------------------------

    @activity.defn(name="rehydrate.finish_tables")
    @user_errors_fail_the_run
    @heartbeats
    async def finish_tables(self, input: GenerationRef) -> int:
        """Create the secondary indexes and ANALYZE; returns the row count. (Sandbox builds, and replays started
        before `index_tables` and `analyze_table` split it so that ANALYZE runs beside the catch-up and swap.)"""
        projection = self.registry.get(input.projection)
        async with self.generations() as generations:
            rows = await generations.index(projection, input.generation)
            await generations.analyze(projection.name, input.generation)
        return rows

    @activity.defn(name="rehydrate.index_tables")
    @user_errors_fail_the_run
    @heartbeats
    async def index_tables(self, input: GenerationRef) -> int:
        """Create the secondary indexes; returns the row count. (ANALYZE is `analyze_table`, beside the swap.)"""
        projection = self.registry.get(input.projection)
        async with self.generations() as generations:
            return await generations.index(projection, input.generation)

    @activity.defn(name="rehydrate.analyze_table")
    @user_errors_fail_the_run
    @heartbeats
    async def analyze_table(self, input: GenerationRef) -> None:
        """ANALYZE the generation's table (nothing if a cancel dropped it meanwhile)."""
        async with self.generations() as generations:
            await generations.analyze(input.projection, input.generation)

    @activity.defn(name="rehydrate.catch_up")
    @user_errors_fail_the_run
    @heartbeats
    async def catch_up(self, input: CatchUpInput) -> CatchUpResult:
        """Apply the events that became visible since the generation's checkpoint, up to the current mark."""
        with tracing.span("catch_up", projection=input.projection, generation=input.generation):
            projection = self.registry.get(input.projection)
            async with self.generations() as generations, generations.conn.transaction():
                applied, mark = await generations.catch_up(projection, input.generation)
            metrics.events_applied(input.projection, applied)
            tracing.annotate(events_applied=applied, mark=mark)
            return CatchUpResult(applied=applied, mark=mark)

    @activity.defn(name="rehydrate.swap")
    @user_errors_fail_the_run
    async def swap(self, input: GenerationRef) -> SwapResult:
        """Apply the last delta and switch readers to the new generation, in one short transaction."""
        with tracing.span("swap", projection=input.projection, generation=input.generation):
            projection = self.registry.get(input.projection)
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with self.generations() as generations:
                        result = await generations.swap(
                            projection, input.generation, allow_dead_letters=input.allow_dead_letters
                        )
                        if not result.committed_before:  # else counted by the attempt that applied them
                            metrics.events_applied(input.projection, result.final_delta)
                        result.dropped_generations = await generations.retire_old(
                            projection, self.settings.retain_generations
                        )
                        tracing.annotate(
                            previous_generation=result.previous_generation or 0,
                            final_delta=result.final_delta,
                            lock_ms=result.lock_ms,
                            rows=result.rows,
                            attempts=attempt,
                        )
                        if self.settings.tails and projection.name in await generations.catalog.tails_to_run():
                            # The tail goes on from the new generation's checkpoint (it reads it afresh).
                            await ensure_tail(activity.client(), projection.name, activity.info().task_queue)
                        return result
                except asyncpg.LockNotAvailableError:
                    # A long reader holds the view; we gave up the lock quickly so readers were not queued
                    # behind us. Try again shortly.
                    activity.heartbeat(f"swap lock busy, attempt {attempt}")
                    tracing.event("swap lock busy", attempt=attempt)
                    await asyncio.sleep(min(0.2 * attempt, 2.0))

    @activity.defn(name="rehydrate.drop_generation")
    @user_errors_fail_the_run
    async def drop_generation(self, input: GenerationRef) -> None:
        """Drop a cancelled or failed generation's table; the active generation is never touched."""
        async with self.generations() as generations:
            await generations.end(input.projection, input.generation, input.reason)

    @activity.defn(name="rehydrate.publish_sandbox")
    @user_errors_fail_the_run
    @heartbeats
    async def publish_sandbox(self, input: GenerationRef) -> int:
        """Finish a sandbox build: its own view in the sandbox schema, the label's older build dropped. Returns
        the events the build parked (on_error="park")."""
        projection = self.registry.get(input.projection)
        async with self.generations() as generations:
            return await generations.publish_sandbox(projection, input.generation)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.plan_replay,
            self.apply_chunk,
            self.finish_tables,
            self.index_tables,
            self.analyze_table,
            self.catch_up,
            self.swap,
            self.drop_generation,
            self.publish_sandbox,
        ]
