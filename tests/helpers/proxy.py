"""A TCP proxy between worker processes and Postgres that can be told to stop forwarding without closing anything.

A silent network partition: no FIN, no RST, no error; the bytes each side sends are simply held, so only a timeout
notices. The proxy keeps reading both sides while it holds, as a network's buffers would accept them: the server's
writes complete and a backend goes idle (in its transaction, if it was in one) waiting for a next command that does
not come. Connections made during the partition are accepted and held too, as if their handshake went unanswered.
On heal, what was held is delivered in order, and a side that closed meanwhile is closed on the other side then.

The proxy runs its own event loop in a thread, so the test's loop (its readers, its timing) does not carry its
traffic; `partition` and `heal` take effect before they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_READ = 1 << 16


@dataclass
class Upstream:
    """Where Postgres listens: a TCP host and port, or a Unix socket's path."""

    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        return cls(host, port)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        return await asyncio.open_connection(self.host, self.port)


class Proxy:
    """Forwards 127.0.0.1:`port` to the Postgres of `upstream_url`; `partition()` holds every byte, `heal()` lets
    them through."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.upstream = Upstream.of(upstream_url)
        self.port = 0
        self.accepted = 0  # connections accepted, over the proxy's life
        self.closed_while_partitioned = 0  # connections a client closed while they were held
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="partition-proxy", daemon=True)

    def url(self, database_url: str) -> str:
        """`database_url` (of the same server as the upstream) pointing at the proxy instead."""
        parts = urlsplit(database_url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
        user = parts.username or ""
        password = f":{parts.password}" if parts.password else ""
        netloc = f"{user}{password}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    def partition(self) -> None:
        """Stop forwarding, in both directions and on every connection, old and new, closing nothing."""
        self._call(self._set(False))

    def heal(self) -> None:
        """Deliver what was held and forward again."""
        self._call(self._set(True))

    @property
    def partitioned(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def close(self) -> None:
        """Close the listener and every connection, and stop the thread."""
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    # -- inside the proxy's loop -------------------------------------------------------------------------------

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._flowing is not None
        self._tasks.add(task)
        self.accepted += 1
        upward: asyncio.Queue[bytes | None] = asyncio.Queue()
        downward: asyncio.Queue[bytes | None] = asyncio.Queue()
        writers = [client_writer]
        pumps: list[asyncio.Task[None]] = []
        try:
            # The client is read at once (its bytes held while partitioned); the server is reached only once the
            # network lets the handshake through.
            pumps.append(asyncio.create_task(self._read(client_reader, upward, client=True)))
            await self._flowing.wait()
            server_reader, server_writer = await self.upstream.open()
            writers.append(server_writer)
            pumps += [
                asyncio.create_task(self._read(server_reader, downward, client=False)),
                asyncio.create_task(self._write(upward, server_writer)),
                asyncio.create_task(self._write(downward, client_writer)),
            ]
            # A side's end (or a reset) ends the connection once what was sent before it is delivered.
            await asyncio.wait(pumps[2:], return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in writers:
                with contextlib.suppress(Exception):
                    writer.close()
            self._tasks.discard(task)

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[bytes | None], *, client: bool) -> None:
        """Read one side as fast as it sends, whether the proxy forwards or holds."""
        try:
            while data := await reader.read(_READ):
                queue.put_nowait(data)
        except OSError:
            pass
        if client and self.partitioned:
            self.closed_while_partitioned += 1
        queue.put_nowait(None)

    async def _write(self, queue: asyncio.Queue[bytes | None], writer: asyncio.StreamWriter) -> None:
        """Deliver the other side's bytes in order, each only while the proxy forwards."""
        assert self._flowing is not None
        while True:
            data = await queue.get()
            await self._flowing.wait()
            if data is None:
                return
            writer.write(data)
            await writer.drain()
