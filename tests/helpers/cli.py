"""The `rehydrate` command as a user runs it: a subprocess with this test's Postgres, Temporal and task queue."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import struct
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

from rehydrate import Settings

REPO = Path(__file__).resolve().parents[2]


UNREACHABLE_DATABASE = "postgresql://nobody:secret@127.0.0.1:1/none"


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"rehydrate {' '.join(self.args)} -> {self.code}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def command_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a user who configured this test's Postgres, Temporal and task queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REHYDRATE_", "TEMPORAL_"))}
    env.update(
        REHYDRATE_DATABASE_URL=str(settings.database_url),
        REHYDRATE_TEMPORAL_ADDRESS=settings.temporal_address,
        REHYDRATE_TEMPORAL_TASK_QUEUE=settings.temporal_task_queue,
        REHYDRATE_PROJECTIONS="tests.helpers.domain",
        REHYDRATE_DATA_DIR=str(settings.data_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


async def rehydrate(settings: Settings, cwd: Path, *args: str, **env: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rehydrate",
        *args,
        cwd=cwd,
        env=command_env(settings, **env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Run(args, process.returncode, stdout.decode(), stderr.decode())


async def on_terminal(settings: Settings, cwd: Path, *args: str) -> Run:
    """`rehydrate` with its standard output on a terminal (a pseudo-terminal 120 columns wide) as a user at one sees
    it: `stdout` is what the terminal received, escape sequences and all, with its line ends as `\n`."""
    terminal, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rehydrate",
            *args,
            cwd=cwd,
            env=command_env(settings, TERM="xterm-256color"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=child,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(child)

    def read() -> bytes:
        received = b""
        with contextlib.suppress(OSError):  # EIO once the command has closed the terminal
            while data := os.read(terminal, 65536):
                received += data
        return received

    try:
        stdout, (_, stderr) = await asyncio.wait_for(asyncio.gather(asyncio.to_thread(read), process.communicate()), 60)
    finally:
        os.close(terminal)
    assert process.returncode is not None
    return Run(args, process.returncode, stdout.decode().replace("\r\n", "\n"), stderr.decode())


def assert_one_clear_error(run: Run, *parts: str) -> str:
    """Exit 1; stderr is one `error:` line naming `parts`, then one `fix:` line; no traceback. Returns the line."""
    assert run.code == 1, run
    assert "Traceback" not in run.stderr + run.stdout, run
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, run
    assert lines[0].startswith("error: ") and lines[1].startswith("  fix: "), run
    for part in parts:
        assert part in lines[0], (part, str(run))
    return lines[0]
