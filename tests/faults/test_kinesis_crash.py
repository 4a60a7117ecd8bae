"""A replay from a Kinesis stream survives its worker being SIGKILLed in the middle of a chunk while producers go on
writing, through the build and the swap; a tail batch afterwards brings the read model to the plain fold of every
record, each applied once (balances are sums: a record applied twice or skipped shows). The stream is moto's server
mode (an emulator of the Kinesis API), the workers are processes started as users start them."""

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
from tests.helpers import domain, kinesis
from tests.helpers.workers import kill_workers, replay_killing_a_worker_mid_chunk

TIME_LIMIT = 150.0


async def test_a_replay_from_a_stream_survives_a_worker_kill_while_producers_write(
    client: Client, settings: Settings, store: EventStore, kinesis_endpoint: str, tmp_path: Path
) -> None:
    stream = f"ledger-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(kinesis_endpoint, stream, 4)
    history = domain.random_history(31, streams=60, events=4000)
    kinesis.write_history(kinesis_endpoint, stream, history)
    written: list[tuple[str, NewEvent]] = list(history)
    projection = kinesis.accounts(kinesis_endpoint, stream)
    env = {
        "REHYDRATE_PROJECTIONS": "tests.helpers.slow_sources",
        "REHYDRATE_TEST_KINESIS_STREAM": stream,
        "REHYDRATE_SOURCE_LEDGER_ENDPOINT_URL": kinesis_endpoint,
        **kinesis.CREDENTIALS,
    }
    logs = {"A": tmp_path / "worker-a.log", "B": tmp_path / "worker-b.log"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    writing = True

    async def producer() -> int:
        batches, seed = 0, 300
        while writing:
            seed += 1
            # The streams of the history and new ones, interleaved: new records land behind and beside the build.
            batch = domain.random_history(seed, streams=70, events=15)
            await asyncio.to_thread(kinesis.write_history, kinesis_endpoint, stream, batch)
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
                total_known=False,
            ),
            TIME_LIMIT,
        )
        writing = False
        batches = await writes
        want = domain.oracle(projection, kinesis.as_events(written))
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
