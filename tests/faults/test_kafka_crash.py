"""A replay from a Kafka topic survives its worker being SIGKILLed in the middle of a chunk while producers go on
writing, through the build and the swap; a tail batch afterwards brings the read model to the plain fold of every
message, each applied once (balances are sums: a message applied twice or skipped shows). The broker is a real
Kafka-protocol broker (tansu), the workers are processes started as users start them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from pathlib import Path

from temporalio.client import Client

from rehydrate import EventStore, NewEvent
from rehydrate.core.settings import Settings
from rehydrate.engine.generations import Generations
from rehydrate.models import ReplayInput
from rehydrate.sources.pools import Sources
from tests.helpers import domain, kafka
from tests.helpers.workers import kill_workers, replay_killing_a_worker_mid_chunk

TIME_LIMIT = 150.0


async def test_a_replay_from_a_topic_survives_a_worker_kill_while_producers_write(
    client: Client, settings: Settings, store: EventStore, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"ledger-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(kafka_bootstrap, topic, 4)
    history = domain.random_history(31, streams=60, events=4000)
    await kafka.write_history(kafka_bootstrap, topic, history)
    written: list[tuple[str, NewEvent]] = list(history)
    projection = kafka.accounts(kafka_bootstrap, topic)
    env = {
        "REHYDRATE_PROJECTIONS": "tests.helpers.slow_sources",
        "REHYDRATE_TEST_KAFKA_TOPIC": topic,
        "REHYDRATE_SOURCE_LEDGER_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    writing = True

    async def producer() -> int:
        batches, seed = 0, 300
        while writing:
            seed += 1
            # The streams of the history and new ones, interleaved: new messages land behind and beside the build.
            batch = domain.random_history(seed, streams=70, events=15)
            await kafka.write_history(kafka_bootstrap, topic, batch)
            written.extend(batch)
            batches += 1
            await asyncio.sleep(0.05)
        return batches

    writes = asyncio.create_task(producer())
    try:
        died, retried = await asyncio.wait_for(
            replay_killing_a_worker_mid_chunk(
                client,
                settings,
                store.pool,
                ReplayInput(projection.name, chunk_size=100, max_parallel=4, heartbeat_timeout_seconds=2),
                workers,
                logs,
                env,
            ),
            TIME_LIMIT,
        )
        writing = False
        batches = await writes
        want = domain.oracle(projection, kafka.as_events(written))
        sources = Sources(store)
        try:
            async with store.pool.acquire() as conn:
                generations = Generations(conn, sources, settings.read_model_schema)
                while (await generations.tail_batch(projection, 100_000) or (0, 0, 0))[1]:
                    pass
        finally:
            await sources.close()
        assert await domain.read_model(store.pool, projection) == want
    finally:
        writing = False
        with contextlib.suppress(BaseException):
            await writes
        await kill_workers(workers, logs)
    assert workers["A"].returncode == -signal.SIGKILL
    assert died and died <= retried, f"the chunks that died with worker A were retried: {died} in {retried}"
    assert batches >= 5, "producers wrote during the build and the swap"
