"""What OpenTelemetry tracing costs a replay: the same replay with REHYDRATE_TRACING off and otlp, alternated.

Usage:

    python bench/tracing_overhead.py                          # 200,000 events, 2 lanes, 3 rounds of off + on
    python bench/tracing_overhead.py --events 1000000 --rounds 5 --chunk-size 5000 --reuse

Over the demo's order history (the store of bench/replay_speed.py, kept in `.rehydrate-bench/`), each round
replays `order_summary` once with tracing off and once with it on (in alternating order, so that a machine busy
with something else weighs on both alike), each time with fresh `rehydrate worker` processes. With tracing on,
the starter and the workers export over OTLP/HTTP to a receiver in this process, as they would to a collector; it
counts the spans it is sent. Prints each replay's seconds and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import os
import statistics
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

from common import postgres_server, spawn_worker, stop_process, temporal, worker_env  # bench/ is on sys.path
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from replay_speed import HOME, build_store, replay

from rehydrate.core import tracing
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client, quiet_exit


class Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver that counts the spans it is sent."""

    spans = 0

    def do_POST(self) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.spans += sum(len(scope.spans) for r in request.resource_spans for scope in r.scope_spans)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextlib.asynccontextmanager
async def workers(settings: Settings, count: int) -> AsyncIterator[None]:
    env = worker_env(
        settings,
        REHYDRATE_PROJECTIONS="rehydrate.examples.orders",
        REHYDRATE_TAILS="false",
        REHYDRATE_TRACING=settings.tracing,
    )
    processes = [spawn_worker(env, HOME / "tracing-worker.log") for _ in range(count)]
    try:
        await asyncio.sleep(3)  # let them connect and poll
        yield
    finally:
        await asyncio.gather(*(stop_process(p) for p in processes))  # SIGTERM: they flush their spans


async def main(args: argparse.Namespace) -> int:
    await asyncio.to_thread(HOME.mkdir, exist_ok=True)
    seconds: dict[str, list[float]] = {"off": [], "otlp": []}
    with receiver() as endpoint:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint  # the workers inherit it
        os.environ["OTEL_SERVICE_NAME"] = "rehydrate-bench"
        async with postgres_server(HOME / "pgdata", delete=False) as server_url, temporal() as plain:
            url, _ = await build_store(server_url, args.events, args.reuse)
            address = plain.service_client.config.target_host
            for round_ in range(args.rounds):
                for mode in ("off", "otlp") if round_ % 2 == 0 else ("otlp", "off"):
                    settings = Settings(
                        database_url=url,
                        temporal_address=address,
                        temporal_task_queue=f"bench-{uuid.uuid4().hex[:6]}",
                        data_dir=HOME / "data",
                        tracing=mode,  # type: ignore[arg-type]
                    )
                    client = await connect_client(settings)  # with tracing on, the starter's span opens the trace
                    async with workers(settings, args.workers):
                        took, applied = await replay(client, settings, args.lanes, args.chunk_size)
                    seconds[mode].append(took)
                    print(f"round {round_ + 1}, tracing {mode:<4}: {took:6.2f} s  {applied / took:>9,.0f} events/s")
        tracing.flush()  # the starter's spans
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["otlp"])
    print(
        f"\n{args.events:,} events, {args.lanes} lane(s), {args.workers} worker(s), {os.cpu_count()} cores; "
        f"median of {args.rounds}: off {off:.2f} s, otlp {on:.2f} s, {on / off - 1:+.1%}; "
        f"spans received: {Receiver.spans:,}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the store")
    parser.add_argument("--lanes", type=int, default=2, help="lanes per replay")
    parser.add_argument("--workers", type=int, default=2, help="rehydrate worker processes")
    parser.add_argument("--chunk-size", type=int, default=None, help="events per chunk (default: the setting's)")
    parser.add_argument("--rounds", type=int, default=3, help="replays with tracing off and with it on")
    parser.add_argument("--reuse", action="store_true", help="reuse a store of the same size from an earlier run")
    quiet_exit(asyncio.run(main(parser.parse_args())))
