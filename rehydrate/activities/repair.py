"""The repair workflow's activity: rebuild one batch of keys of the live read model in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity

from rehydrate.activities._common import Activities, user_errors_fail_the_run
from rehydrate.core import tracing
from rehydrate.core.limits import MAX_SHOW, check_range
from rehydrate.core.settings import Settings
from rehydrate.engine.projections import Registry
from rehydrate.engine.repair import repair_keys
from rehydrate.models import RepairBatchInput, RepairResult


class RepairActivities(Activities):
    """The repair workflow's activity, with the worker's projections."""

    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        super().__init__(pool, settings)
        self.registry = registry

    @activity.defn(name="rehydrate.repair_keys")
    @user_errors_fail_the_run
    async def repair_keys(self, input: RepairBatchInput) -> RepairResult:
        """Under the projection's lock, in one transaction: the keys' rows rebuilt from their whole history."""
        projection = self.registry.get(input.projection)
        check_range("show", input.show, 0, MAX_SHOW)
        with tracing.span("repair", projection=input.projection, keys=len(input.keys), dry_run=input.dry_run):
            async with self.generations() as generations:
                done = await repair_keys(generations, projection, input.keys, dry_run=input.dry_run, show=input.show)
        return RepairResult(
            input.projection,
            generation=done.generation,
            keys=done.keys,
            changed=done.changed,
            events=done.events,
            first=done.first,
            dry_run=input.dry_run,
            stale=done.stale,
            batches=1,
        )

    def all(self) -> list[Callable[..., Any]]:
        return [self.repair_keys]
