"""The worker's Prometheus endpoint serves Temporal's metrics and rehydrate's, with real values; JSON logs."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import urllib.request

import orjson
from temporalio.client import Client

from rehydrate import EventStore
from rehydrate.core import logs, metrics
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client
from rehydrate.models import ReplayInput
from rehydrate.starter import start_replay, wait_for_replay
from rehydrate.worker import running_worker
from tests.helpers import domain
from tests.helpers.ports import free_port


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of metric `name` whose labels include `labels`."""
    values = []
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            values.append(float(match.group(2)))
    return values


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


async def test_metrics_endpoint_serves_events_applied_chunk_durations_and_phase_after_a_replay(
    client: Client, settings: Settings, store: EventStore
) -> None:
    await domain.append_all(store, domain.random_history(41, streams=20, events=400))
    port = free_port()
    runtime = metrics.prometheus_runtime(port, host="127.0.0.1")
    metrics.declare(runtime, ["accounts"])
    measured = await connect_client(settings, runtime=runtime)
    async with running_worker(settings, domain.registry(), client=measured):
        handle = await start_replay(client, settings, ReplayInput("accounts", lanes=2, chunk_size=40))
        result = await wait_for_replay(handle)
        await asyncio.sleep(1.5)  # the exporter publishes what the core has aggregated, about every second
        text = await scrape(port)
    assert result.events_applied > 0
    assert sum(samples(text, "rehydrate_events_applied", projection="accounts")) == result.events_applied
    chunks = sum(samples(text, "rehydrate_chunk_duration_seconds_count", projection="accounts"))
    assert chunks >= result.events_applied / 40
    assert samples(text, "rehydrate_replay_phase", projection="accounts") == [6.0]  # done
    assert samples(text, "rehydrate_dead_letters", projection="accounts") == [0.0]
    assert sum(samples(text, "temporal_activity_execution_latency_count", activity_type="rehydrate.apply_chunk")) > 0


def test_json_logs_carry_the_activity_context_one_object_a_line() -> None:
    stream = io.StringIO()
    logs.configure(json=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        log = logging.getLogger("rehydrate.test")
        with logs.context(projection="accounts", generation=3, lane=1, chunk="7"):
            log.info("chunk applied: %d events", 40)
        log.warning("outside")
    finally:
        logs.configure(json=False)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message", "projection", "generation", "lane", "chunk")} == {
        "level": "info",
        "logger": "rehydrate.test",
        "message": "chunk applied: 40 events",
        "projection": "accounts",
        "generation": 3,
        "lane": 1,
        "chunk": "7",
    }
    assert "projection" not in second and second["message"] == "outside"
