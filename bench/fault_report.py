"""Run the fault suite (the FILES below) and print its figures as a table: docs/reliability.md's.

    python bench/fault_report.py [extra pytest arguments]

Environment: REHYDRATE_FAULT_EVENTS sets the history's size (default 100,000); REHYDRATE_TEST_DATABASE_URL a
Postgres to use instead of the embedded one (the Postgres-restart test always starts a private embedded one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The fault tests that report figures (the `figures` fixture of tests/faults/conftest.py).
FILES = ("tests/faults/test_faults.py", "tests/faults/test_partition.py", "tests/faults/test_temporal_kill.py")
COLUMNS = (
    ("fault", "fault"),
    ("faults_injected", "faults injected"),
    ("replays_completed", "replays completed"),
    ("rows_compared", "rows compared"),
    ("rows_wrong", "rows wrong"),
    ("events_lost_or_doubled", "events lost or doubled"),
    ("slowest_recovery", "slowest recovery (s)"),
    ("seconds", "test (s)"),
)


def table(records: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for record in records:
        lines.append(
            "| "
            + " | ".join(f"{record[key]:,}" if isinstance(record[key], int) else str(record[key]) for key, _ in COLUMNS)
            + " |"
        )
    total = {key: sum(int(r[key]) for r in records) for key, _ in COLUMNS[1:6]}  # type: ignore[call-overload]
    slowest = max((float(r["slowest_recovery"]) for r in records), default=0.0)  # type: ignore[arg-type]
    lines.append(
        "| **all** | "
        + " | ".join(f"{total[key]:,}" for key, _ in COLUMNS[1:6])
        + f" | {slowest} | "
        + f"{sum(float(r['seconds']) for r in records):.1f} |"  # type: ignore[arg-type]
    )
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rehydrate-faults-") as scratch:
        report = Path(scratch) / "fault-report.jsonl"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *FILES,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={scratch}/pytest",
            *sys.argv[1:],
        ]
        status = subprocess.call(command, cwd=REPO, env={**os.environ, "REHYDRATE_FAULT_REPORT": str(report)})
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    events = {int(r["events"]) for r in records}
    print(f"\nhistory: {', '.join(f'{n:,}' for n in sorted(events))} events per replay; pytest exit status {status}\n")
    print(table(records))
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
