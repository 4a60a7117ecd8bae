"""Worker Versioning: the build a worker is (derived from its code), and making that build the deployment's current
version, so that a rolling deploy sends new runs to the new workers while running replays finish on the old ones.

Every workflow is pinned: a run stays on the build it started on, whatever becomes current meanwhile, and its
activities run only on workers of that build. A tail, which never ends, continues as new on the current build when
one is made current, between two of its activity runs (a clean boundary); `rehydrate projections` then marks the read
model STALE until a replay rebuilds it with that code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from importlib.metadata import version

from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

from rehydrate.core.errors import worker_identity
from rehydrate.core.settings import Settings
from rehydrate.engine.aggregates import AggregateRegistry
from rehydrate.engine.projections import Registry

log = logging.getLogger("rehydrate.deployment")
_AGAIN = (
    RPCStatusCode.NOT_FOUND,
    RPCStatusCode.FAILED_PRECONDITION,
    RPCStatusCode.ABORTED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.UNAVAILABLE,
)


def build_id(registry: Registry, aggregates: AggregateRegistry) -> str:
    """The build of a worker: rehydrate's version and a hash of its projections' and aggregates' fingerprints. Two
    workers with the same code are one build; any change to a handler, a table, an upcaster or a version is another."""
    digest = hashlib.sha256()
    for projection in registry:
        digest.update(f"projection {projection.name} {projection.fingerprint}\n".encode())
    for aggregate in aggregates:
        digest.update(f"aggregate {aggregate.aggregate_type} {aggregate.fingerprint()}\n".encode())
    return f"{version('rehydrate')}-{digest.hexdigest()[:12]}"


def deployment_config(
    settings: Settings, registry: Registry, aggregates: AggregateRegistry
) -> WorkerDeploymentConfig | None:
    """The worker's deployment version when `worker_deployment` is set (None: an unversioned worker)."""
    if not settings.worker_deployment:
        return None
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(settings.worker_deployment, build_id(registry, aggregates)),
        use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.PINNED,
    )


async def current_build(client: Client, deployment: str) -> str | None:
    """The build id of the deployment's current version (None: none is current, or no such deployment)."""
    try:
        response = await client.workflow_service.describe_worker_deployment(
            DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment)
        )
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return response.worker_deployment_info.routing_config.current_deployment_version.build_id or None


async def promote(client: Client, deployment: str, build: str, *, wait_seconds: float = 30.0) -> bool:
    """Make `build` the deployment's current version, unless a build created after it is current (an old worker that
    restarts during or after a rolling deploy leaves the new one current). Waits up to `wait_seconds` for the server
    to see the build's workers poll. True when `build` is current afterwards."""
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        try:
            response = await client.workflow_service.describe_worker_deployment(
                DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment)
            )
            info = response.worker_deployment_info
            created = {
                summary.deployment_version.build_id: summary.create_time.ToDatetime()
                for summary in info.version_summaries
            }
            current = info.routing_config.current_deployment_version.build_id
            if build in created:
                if current == build:
                    return True
                if current and current in created and created[current] > created[build]:
                    log.info(
                        "build %s of deployment %r is older than the current build %s: left as is",
                        build,
                        deployment,
                        current,
                    )
                    return False
                await client.workflow_service.set_worker_deployment_current_version(
                    SetWorkerDeploymentCurrentVersionRequest(
                        namespace=client.namespace,
                        deployment_name=deployment,
                        build_id=build,
                        conflict_token=response.conflict_token,
                        identity=worker_identity(),
                    )
                )
                log.info("build %s is now the current version of deployment %r", build, deployment)
                return True
        except RPCError as error:
            # NOT_FOUND: the deployment does not exist until a worker of it polls; FAILED_PRECONDITION or ABORTED:
            # another worker changed the deployment meanwhile (the conflict token), so look again; RESOURCE_EXHAUSTED:
            # the server rate-limits calls on one deployment.
            if error.status not in _AGAIN:
                log.warning("build %s of deployment %r was not made current: %s", build, deployment, error.message)
                return False
        if asyncio.get_running_loop().time() > deadline:
            log.warning(
                "build %s of deployment %r: the server did not list it within %.0f s; not made current",
                build,
                deployment,
                wait_seconds,
            )
            return False
        await asyncio.sleep(1.0)
