"""The Temporal Web UI as rehydrate's console: a replay started the way the UI starts it, search attributes,
current details and activity summaries, kept across continue-as-new."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.converter import DataConverter

from rehydrate import EventStore
from rehydrate.core import search_attributes
from rehydrate.core.settings import Settings
from rehydrate.worker import running_worker
from tests.helpers import domain


async def test_a_replay_started_like_the_web_ui_does_runs_to_completion(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(31, streams=20, events=300))
    async with running_worker(settings, domain.registry(), client=client):
        # Exactly what the UI's Start Workflow form sends: a workflow type, a task queue, one JSON payload.
        result: dict[str, Any] = await client.execute_workflow(
            "Replay",
            {"projection": "group_totals"},
            id=f"ui-{uuid.uuid4().hex[:8]}",
            task_queue=settings.temporal_task_queue,
        )
    events = await domain.all_events(store)
    expected = domain.oracle(domain.group_totals, events)
    assert await domain.read_model(store.pool, domain.group_totals) == expected
    assert (result["projection"], result["generation"], result["rows"], result["skipped"]) == (
        "group_totals",
        1,
        len(expected),
        None,
    )
    handled = sum(1 for event in events if event.type in domain.group_totals.event_types)
    assert result["events_applied"] == handled


async def replay_like_the_ui(client: Client, settings: Settings, input: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Run a replay as the Web UI's Start Workflow form starts it (a type, a task queue, one JSON payload), on a
    running worker; returns its workflow id and result."""
    workflow_id = f"ui-{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = await client.execute_workflow(
        "Replay", input, id=workflow_id, task_queue=settings.temporal_task_queue
    )
    return workflow_id, result


async def run_ids(client: Client, workflow_id: str) -> list[str]:
    """Every run of a workflow id, oldest first (visibility is eventually consistent: wait until all closed)."""
    deadline = time.monotonic() + 30
    while True:
        runs = [r async for r in client.list_workflows(f'WorkflowId = "{workflow_id}"')]
        if all(r.status != WorkflowExecutionStatus.RUNNING for r in runs) or time.monotonic() > deadline:
            return [r.run_id for r in sorted(runs, key=lambda r: r.start_time)]
        await asyncio.sleep(0.3)


async def test_search_attributes_details_and_summaries_survive_continue_as_new(
    client: Client, settings: Settings, store: EventStore
) -> None:
    # 1,000 events in chunks of 5 over 2 lanes: ~200 activities, past the session's continue-as-new limit.
    await domain.import_all(store, domain.random_history(32, streams=25, events=1000))
    async with running_worker(settings, domain.registry(), client=client):
        workflow_id, result = await replay_like_the_ui(
            client, settings, {"projection": "accounts", "lanes": 2, "chunk_size": 5}
        )
        assert result["runs"] > 1
        runs = await run_ids(client, workflow_id)
        assert len(runs) == result["runs"]
        # Current details are the workflow's own: each run sets them (the query replays the closed run).
        details = []
        for run_id in runs:
            metadata = await client.get_workflow_handle(workflow_id, run_id=run_id).query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata
            )
            details.append(metadata.current_details)
            assert {s.name for s in metadata.definition.signal_definitions} >= {"pause", "resume"}

    assert all(d.startswith("**accounts**") for d in details), details
    assert "phase **building**" in details[-2] and "lane 0:" in details[-2], details[-2]
    assert "generation 1 active" in details[-1], details[-1]

    for index, run_id in enumerate(runs):
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(search_attributes.PROJECTION) == "accounts", run_id
        if index < len(runs) - 1:
            assert attributes.get(search_attributes.PHASE) == "building"
            assert 0 < (attributes.get(search_attributes.PROGRESS) or 0) < 100
        else:
            assert (attributes.get(search_attributes.PHASE), attributes.get(search_attributes.PROGRESS)) == (
                "done",
                100,
            )
        # The run after a continue-as-new upserts the attributes itself (its first workflow task).
        history = await handle.fetch_history()
        upserts = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES]
        assert upserts, f"run {index + 1} upserted no search attributes"
        summaries = [
            DataConverter.default.payload_converter.from_payloads([e.user_metadata.summary])
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]
        chunks = [s[0] for s in summaries if str(s[0]).startswith("lane ")]
        assert chunks and all("position" in c for c in chunks), summaries[:5]

    # The UI's list filter finds the runs by projection.
    found = [
        r.id async for r in client.list_workflows(f'RehydrateProjection = "accounts" AND WorkflowId = "{workflow_id}"')
    ]
    assert len(found) == len(runs)


async def test_progress_is_upserted_at_most_once_a_second_and_the_phases_every_time(
    client: Client, settings: Settings, store: EventStore
) -> None:
    """Each upsert is a history event and a visibility write; a chunk's progress is not worth one every time."""
    await domain.append_all(store, domain.random_history(33, streams=20, events=600))
    async with running_worker(settings, domain.registry(), client=client):
        workflow_id, result = await replay_like_the_ui(
            client, settings, {"projection": "accounts", "lanes": 2, "chunk_size": 20}
        )
    handle = client.get_workflow_handle(workflow_id)
    history = await handle.fetch_history()
    assert result["runs"] == 1
    chunks = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "rehydrate.apply_chunk"
    ]
    upserts = [  # ours, not the SDK's upserts of TemporalChangeVersion that record a patch
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
        and search_attributes.PROGRESS.name
        in e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
    ]
    seconds = (history.events[-1].event_time.ToDatetime() - history.events[0].event_time.ToDatetime()).total_seconds()
    phases = 5  # planning, building, indexing, catching_up, swapping, done: the first is shown with the second
    assert len(chunks) >= 20
    assert len(upserts) <= phases + 1 + int(seconds), (len(upserts), seconds)
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(search_attributes.PHASE), attributes.get(search_attributes.PROGRESS)) == ("done", 100)
