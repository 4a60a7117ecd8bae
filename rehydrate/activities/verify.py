"""The verify workflow's activities: read the live mark, compare the rebuild with the live generation, drop it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity

from rehydrate.activities._common import Activities, user_errors_fail_the_run
from rehydrate.activities.replay import search_attributes_registered
from rehydrate.core.limits import MAX_SHOW, check_range
from rehydrate.core.settings import Settings
from rehydrate.engine.projections import Registry
from rehydrate.models import VerifyCompareInput, VerifyResult, VerifyStart, VerifyStartInput
from rehydrate.models.names import replay_workflow_id, verify_label


class VerifyActivities(Activities):
    """The verify workflow's activities, with the worker's projections."""

    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.registry = registry

    @activity.defn(name="rehydrate.verify_start")
    @user_errors_fail_the_run
    async def verify_start(self, input: VerifyStartInput) -> VerifyStart:
        """Read the live generation and its checkpoint: the mark the sandbox is rebuilt at."""
        projection = self.registry.get(input.projection)
        check_range("show", input.show, 0, MAX_SHOW)
        async with self.generations() as generations:
            catalog = generations.catalog
            live = await catalog.active_generation(projection.name)
            mark = (await catalog.generation(projection.name, live))["checkpoint"]
            building = await catalog.building_generation(projection.name)
        registered = await search_attributes_registered()
        if building is not None and input.skip_if_running:
            # The generation it is building is about to replace the live one: verify that one next time.
            return VerifyStart(live, int(mark), registered, running_elsewhere=str(building["workflow_id"]))
        rebuild_id = replay_workflow_id(projection.name, verify_label(projection.name), activity.info().task_queue)
        return VerifyStart(live, int(mark), registered, rebuild_workflow_id=rebuild_id)

    @activity.defn(name="rehydrate.verify_compare")
    @user_errors_fail_the_run
    async def verify_compare(self, input: VerifyCompareInput) -> VerifyResult:
        """Under the projection's lock: catch the sandbox up to the live checkpoint, compare row hashes."""
        projection = self.registry.get(input.projection)
        async with self.generations() as generations:
            return await generations.compare_with_live(projection, input.sandbox, input.sandbox_generation, input.show)

    @activity.defn(name="rehydrate.drop_verify_sandbox")
    @user_errors_fail_the_run
    async def drop_verify_sandbox(self, label: str) -> int:
        """Drop the verify's sandbox schema and forget its builds; nothing to drop is not an error (a retry)."""
        async with self.generations() as generations:
            return await generations.drop_sandbox(label, missing_ok=True)

    def all(self) -> list[Callable[..., Any]]:
        return [self.verify_start, self.verify_compare, self.drop_verify_sandbox]
