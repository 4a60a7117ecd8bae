"""The Temporal client, with a clear error when the server cannot be reached."""

from __future__ import annotations

from temporalio.client import Client

from rehydrate.errors import UserError
from rehydrate.settings import Settings


async def connect_client(settings: Settings) -> Client:
    try:
        return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    except Exception as error:
        raise UserError(
            f"cannot connect to Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace!r}): {error}",
            fix="start it (`rehydrate dev`) or set REHYDRATE_TEMPORAL_ADDRESS / TEMPORAL_ADDRESS",
        ) from None
