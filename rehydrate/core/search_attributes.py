"""The search attributes rehydrate's workflows carry, so the Temporal Web UI's list can be filtered by them."""

from __future__ import annotations

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

PROJECTION = SearchAttributeKey.for_keyword("RehydrateProjection")
PHASE = SearchAttributeKey.for_keyword("RehydratePhase")
PROGRESS = SearchAttributeKey.for_int("RehydrateProgress")  # percent of the events applied

KEYS: list[SearchAttributeKey[str] | SearchAttributeKey[int]] = [PROJECTION, PHASE, PROGRESS]
TYPES = {PROJECTION.name: "Keyword", PHASE.name: "Keyword", PROGRESS.name: "Int"}


def dev_server_args() -> list[str]:
    """`temporal server start-dev` arguments that register the attributes."""
    args: list[str] = []
    for name, kind in TYPES.items():
        args += ["--search-attribute", f"{name}={kind}"]
    return args


def create_commands(namespace: str) -> list[str]:
    """The `temporal` CLI commands that register the attributes on a real cluster."""
    return [
        f"temporal operator search-attribute create --namespace {namespace} --name {name} --type {kind}"
        for name, kind in TYPES.items()
    ]


async def registered(client: Client) -> bool:
    """True when the namespace has all three attributes with the right types.

    A workflow that upserts an unregistered attribute has its workflow task fail over and over, so the replay
    upserts them only when this (run in an activity, so the workflow stays deterministic) says they exist.
    """
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    expected = {
        PROJECTION.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        PHASE.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        PROGRESS.name: IndexedValueType.INDEXED_VALUE_TYPE_INT,
    }
    return all(response.custom_attributes.get(name) == kind for name, kind in expected.items())
