"""The verify workflow's activities: read the live mark, compare the rebuild with the live generation, drop it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity

from rehydrate import catalog
from rehydrate.activities.replay import _search_attributes_registered, _user_errors_fail_the_replay
from rehydrate.errors import UserError
from rehydrate.models import VerifyCompareInput, VerifyResult, VerifyStart, VerifyStartInput
from rehydrate.operations import compare_with_live
from rehydrate.projections import Registry
from rehydrate.settings import Settings
from rehydrate.store import EventStore

MAX_SHOW = 1_000  # differing keys a result may name: it travels through Temporal


class VerifyActivities:
    """Holds the worker's database pool and projections; each method is one activity."""

    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        self.pool = pool
        self.registry = registry
        self.schema = settings.schema_name
        self.read_schema = settings.read_model_schema
        self.store = EventStore(pool, self.schema)

    @activity.defn(name="rehydrate.verify_start")
    async def verify_start(self, input: VerifyStartInput) -> VerifyStart:
        """Read the live generation and its checkpoint: the mark the sandbox is rebuilt at."""

        async def work() -> VerifyStart:
            projection = self.registry.get(input.projection)
            if not 0 <= input.show <= MAX_SHOW:
                raise UserError(f"show={input.show} is out of range", fix=f"use 0 to {MAX_SHOW}")
            async with self.pool.acquire() as conn:
                live = await catalog.active_generation(conn, self.schema, projection.name)
                mark = (await catalog.generation_row(conn, self.schema, projection.name, live))["checkpoint"]
                building = await catalog.building_generation(conn, self.schema, projection.name)
            registered = await _search_attributes_registered()
            if building is not None and input.skip_if_running:
                # The generation it is building is about to replace the live one: verify that one next time.
                return VerifyStart(live, int(mark), registered, running_elsewhere=str(building["workflow_id"]))
            return VerifyStart(live, int(mark), registered)

        return await _user_errors_fail_the_replay(work)

    @activity.defn(name="rehydrate.verify_compare")
    async def verify_compare(self, input: VerifyCompareInput) -> VerifyResult:
        """Under the projection's tail lock: catch the sandbox up to the live checkpoint, compare row hashes."""

        async def work() -> VerifyResult:
            projection = self.registry.get(input.projection)
            return await compare_with_live(
                self.pool,
                self.store,
                self.read_schema,
                projection,
                input.sandbox,
                input.sandbox_generation,
                input.show,
            )

        return await _user_errors_fail_the_replay(work)

    @activity.defn(name="rehydrate.drop_verify_sandbox")
    async def drop_verify_sandbox(self, label: str) -> int:
        """Drop the verify's sandbox schema and forget its builds; nothing to drop is not an error (a retry)."""

        async def work() -> int:
            async with self.pool.acquire() as conn:
                return await catalog.drop_sandbox(conn, self.schema, label, missing_ok=True)

        return await _user_errors_fail_the_replay(work)

    def all(self) -> list[Callable[..., Any]]:
        return [self.verify_start, self.verify_compare, self.drop_verify_sandbox]
