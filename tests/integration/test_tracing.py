"""OpenTelemetry tracing: a traced replay is one trace from the starter through the workflow (across continue-as-new)
to every chunk, with rehydrate's own spans and attributes; tracing off adds nothing; the exporter follows OTEL_*."""

from __future__ import annotations

import itertools
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.worker import Replayer

from rehydrate import EventStore
from rehydrate.core import tracing
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client
from rehydrate.core.tracing_interceptor import RehydrateTracingInterceptor
from rehydrate.models import ReplayInput, ReplayProgress
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import WORKFLOWS, running_worker, workflow_runner
from rehydrate.workflows import ReplayWorkflow
from tests.helpers import domain


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process ends, kept in memory: the process's tracer provider (OpenTelemetry allows one per
    process, so rehydrate keeps it instead of installing its own, as it would an application's)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set this process's tracer provider first"
    yield exporter
    exporter.clear()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in found if span.name == name]


def of_workflow(found: list[ReadableSpan], workflow_id: str) -> list[ReadableSpan]:
    """The workflow's spans and rehydrate's inside its activities (queries from `wait_for_replay` are left out:
    each is a trace of its own)."""
    ids = {s.context.span_id for s in found if attrs(s).get("temporalWorkflowID") == workflow_id}
    ours = [s for s in found if s.parent is not None and s.parent.span_id in ids and s.name.startswith("rehydrate.")]
    return [
        s for s in found if s.context.span_id in ids and not s.name.startswith(("QueryWorkflow", "HandleQuery"))
    ] + ours


async def test_a_traced_replay_is_one_trace_from_the_starter_through_every_run_to_each_chunk(
    spans: InMemorySpanExporter, settings: Settings, store: EventStore
) -> None:
    # 600 events in chunks of 5 over 2 lanes: ~120 chunks, past the session's continue-as-new limit.
    await domain.append_all(store, domain.random_history(51, streams=25, events=600))
    traced_settings = settings.model_copy(update={"tracing": "otlp"})
    traced = await connect_client(traced_settings)
    assert [type(i) for i in traced.config()["interceptors"]] == [RehydrateTracingInterceptor]
    spans.clear()
    progress: list[ReplayProgress] = []
    async with running_worker(traced_settings, domain.registry(), client=traced):
        handle = await start_replay(traced, traced_settings, ReplayInput("accounts", lanes=2, chunk_size=5))
        await handle.signal(ReplayWorkflow.resume)  # not paused: changes nothing, but is traced
        result = await wait_for_replay(handle, progress.append, interval=0.1)
    assert result.runs > 1
    assert progress, "the watch loop polled progress"
    everything = list(spans.get_finished_spans())
    # The watch loop's progress polls are not traced (one trace each, thousands for a long replay); signals are.
    assert not [span for span in everything if "Query" in span.name]
    assert sorted(span.name for span in everything if "Signal" in span.name) == [
        "HandleSignal:resume",
        "SignalWorkflow:resume",
    ]
    # The signal is a trace of its own (sent outside any span); the workflow's handling of it, in the replay's trace,
    # links to it.
    [sent] = named(everything, "SignalWorkflow:resume")
    [handled] = named(everything, "HandleSignal:resume")
    assert [link.context.span_id for link in handled.links] == [sent.context.span_id]
    found = [span for span in of_workflow(everything, handle.id) if span is not sent]

    assert len(named(found, "StartWorkflow:Replay")) == 1
    runs = named(found, "RunWorkflow:Replay")
    assert len({attrs(span)["temporalRunID"] for span in runs}) == result.runs  # every run, after continue-as-new
    chunk_activities = named(found, "RunActivity:rehydrate.apply_chunk")
    chunks = named(found, "rehydrate.chunk")
    assert len(chunks) == len(chunk_activities) >= result.events_applied / 5
    assert {span.parent.span_id for span in chunks if span.parent} == {s.context.span_id for s in chunk_activities}
    assert len({span.context.trace_id for span in found}) == 1, "starter, workflow runs and activities: one trace"

    # The chunks' attributes: each lane's chunks follow on from one another, and add up to the replay's count.
    by_lane: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for span in sorted(chunks, key=lambda span: span.start_time or 0):
        a = attrs(span)
        assert (a["rehydrate.projection"], a["rehydrate.generation"]) == ("accounts", result.generation)
        assert a["rehydrate.chunk_size"] == 5 and a["rehydrate.chunk"]
        by_lane[a["rehydrate.lane"]].append(a)
    assert sorted(by_lane) == [0, 1]
    for lane in by_lane.values():
        assert lane[0]["rehydrate.from_position"] == 0
        assert all(
            after["rehydrate.from_position"] == before["rehydrate.to_position"]
            for before, after in itertools.pairwise(lane)
        )
        assert [a["rehydrate.lane_done"] for a in lane] == [False] * (len(lane) - 1) + [True]
    assert sum(attrs(span)["rehydrate.events_applied"] for span in chunks) == result.events_applied

    [swap] = named(found, "rehydrate.swap")
    assert attrs(swap)["rehydrate.generation"] == result.generation
    assert attrs(swap)["rehydrate.rows"] == result.rows
    assert attrs(swap)["rehydrate.final_delta"] == 0 and attrs(swap)["rehydrate.attempts"] == 1
    assert named(found, "rehydrate.catch_up")

    # The workflow stays deterministic with the interceptor, and a traced history replays without it too (a worker
    # restarted with tracing off).
    for run_id in sorted({attrs(span)["temporalRunID"] for span in runs}):
        history = await traced.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        for interceptors in ([RehydrateTracingInterceptor()], []):
            replayer = Replayer(workflows=list(WORKFLOWS), workflow_runner=workflow_runner(), interceptors=interceptors)
            await replayer.replay_workflow(history)


async def test_a_replay_started_without_a_trace_has_a_trace_per_activity(
    spans: InMemorySpanExporter, client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(52, streams=10, events=200))
    traced_settings = settings.model_copy(update={"tracing": "otlp"})
    spans.clear()
    async with running_worker(traced_settings, domain.registry(), client=await connect_client(traced_settings)):
        # As the Web UI and schedules start it: no client span to join.
        workflow_id = f"ui-{uuid.uuid4().hex[:8]}"
        result = await client.execute_workflow(
            "Replay",
            {"projection": "accounts", "lanes": 2, "chunk_size": 50},
            id=workflow_id,
            task_queue=settings.temporal_task_queue,
        )
    found = of_workflow(list(spans.get_finished_spans()), workflow_id)
    assert not [span for span in found if span.name.endswith("Workflow:Replay")]
    activities = [span for span in found if span.name.startswith("RunActivity:")]
    assert all(span.parent is None for span in activities)
    assert len({span.context.trace_id for span in activities}) == len(activities) >= 6  # plan, chunks, ..., swap
    chunks = named(found, "rehydrate.chunk")
    assert sum(attrs(span)["rehydrate.events_applied"] for span in chunks) == result["events_applied"]
    parents = {span.context.span_id: span for span in activities}
    for span in chunks:
        assert span.parent is not None and span.context.trace_id == parents[span.parent.span_id].context.trace_id


async def test_tracing_off_adds_no_interceptor_and_no_span(
    spans: InMemorySpanExporter, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(53, streams=10, events=200))
    assert settings.tracing == "off"
    plain = await connect_client(settings)
    assert plain.config()["interceptors"] == []
    spans.clear()
    async with running_worker(settings, domain.registry(), client=plain):
        handle = await start_replay(plain, settings, ReplayInput("accounts", lanes=2, chunk_size=50))
        await wait_for_replay(handle)
    assert spans.get_finished_spans() == ()
    with tracing.span("chunk", lane=0) as span:
        assert span is None
