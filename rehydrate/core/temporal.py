"""The Temporal client: address, namespace, TLS or API key from settings and Temporal's environment configuration,
with a clear error when the server cannot be reached; and how a process that used it exits. Credentials are never
printed.

Temporal's SDK is imported by the functions that use it (it takes a quarter of a second): every `rehydrate` command
imports this module for `quiet_exit`, and many of them never talk to Temporal."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rehydrate.core.errors import UserError
from rehydrate.core.tracing import interceptors

if TYPE_CHECKING:
    from temporalio.client import Client
    from temporalio.runtime import Runtime
    from temporalio.service import TLSConfig

    from rehydrate.core.settings import Settings


def _read(path: Path | None, variable: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes()
    except OSError as error:
        raise UserError(
            f"cannot read {variable} {str(path)!r}: {error.strerror}", fix=f"point {variable} at a readable PEM file"
        ) from None


def tls_config(settings: Settings) -> TLSConfig | bool | None:
    """TLS from settings: a TLSConfig when certificates or a server name are set, else the TEMPORAL_TLS flag."""
    from temporalio.service import TLSConfig

    s = settings
    if s.temporal_tls is False:
        return False
    if (s.temporal_tls_client_cert_path is None) != (s.temporal_tls_client_key_path is None):
        raise UserError(
            "mTLS needs both a client certificate and its key",
            fix="set both TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH (or neither)",
        )
    paths = (s.temporal_tls_client_cert_path, s.temporal_tls_server_ca_cert_path, s.temporal_tls_server_name)
    if any(value is not None for value in paths):
        return TLSConfig(
            server_root_ca_cert=_read(s.temporal_tls_server_ca_cert_path, "TEMPORAL_TLS_SERVER_CA_CERT_PATH"),
            client_cert=_read(s.temporal_tls_client_cert_path, "TEMPORAL_TLS_CLIENT_CERT_PATH"),
            client_private_key=_read(s.temporal_tls_client_key_path, "TEMPORAL_TLS_CLIENT_KEY_PATH"),
            domain=s.temporal_tls_server_name,
        )
    return True if s.temporal_tls else None


def connect_options(settings: Settings) -> dict[str, Any]:
    """`Client.connect` keyword arguments: Temporal's environment configuration (TOML profile and TEMPORAL_*
    variables, as the `temporal` CLI reads them), overlaid with the settings that were set."""
    from temporalio.envconfig import ClientConfig

    tls = tls_config(settings)  # first: a missing certificate gets its own message naming the variable
    try:
        options: dict[str, Any] = dict(ClientConfig.load_client_connect_config(profile=settings.temporal_profile))
    except Exception as error:  # the SDK reports a bad profile file or an unknown profile as a plain exception
        raise UserError(
            f"Temporal's client configuration is invalid: {error}",
            fix="check TEMPORAL_CONFIG_FILE / TEMPORAL_PROFILE and the profile file",
        ) from None
    given = settings.model_fields_set
    if "temporal_address" in given or "target_host" not in options:
        options["target_host"] = settings.temporal_address
    if "temporal_namespace" in given or "namespace" not in options:
        options["namespace"] = settings.temporal_namespace
    if settings.temporal_api_key is not None:
        options["api_key"] = settings.temporal_api_key.get_secret_value()
        options.setdefault("tls", True)  # an API key travels over TLS only (Temporal Cloud)
    if tls is not None:
        options["tls"] = tls
    return options


async def connect_client(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client for the settings' cluster; with tracing on, it (and any worker built on it) traces."""
    from temporalio.client import Client

    options = connect_options(settings)
    address, namespace = options["target_host"], options["namespace"]
    traced = interceptors(settings)  # before connecting: a missing package is the error to report
    try:
        return await Client.connect(**options, runtime=runtime, interceptors=traced)
    except Exception as error:
        raise UserError(
            f"cannot connect to Temporal at {address} (namespace {namespace!r}): {error}",
            fix="start it (`rehydrate dev`) or set REHYDRATE_TEMPORAL_ADDRESS / TEMPORAL_ADDRESS "
            "(and TLS or an API key for a real cluster)",
        ) from None


async def workers_polling(client: Client, task_queue: str) -> int:
    """The worker processes polling `task_queue` for activities (Temporal forgets a poller a few minutes after
    its last poll)."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
    )
    return len({poller.identity for poller in response.pollers})


def quiet_exit(code: int) -> None:
    """Flush and leave without running interpreter finalisers.

    A process that used Temporal's client can crash in `PyGILState_Release` at interpreter exit
    (sdk-python#300); exiting with os._exit after flushing avoids it.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
