"""The one line that sums up a verify's or a repair's result: the workflows show it in the Web UI (a drift as the
run's failure), and schedules and the CLI print it. Apart from the workflows that run them, so that printing a
result does not import the activities and the engine behind them."""

from __future__ import annotations

from rehydrate.core.errors import shorten
from rehydrate.models import RepairResult, VerifyResult


def drift_message(result: VerifyResult) -> str:
    """One line for the run's failure, the schedule's outcome and the UI: the count and the first keys."""
    first = ", ".join(f"{shorten(d.key, 80)} ({d.problem})" for d in result.first)
    stale = "; the live generation is STALE (built from other code): drift is expected" if result.stale else ""
    return shorten(
        f"drift: {result.differing:,} key(s) of {result.projection} differ between generation "
        f"{result.live_generation} ({result.live_rows:,} rows) and a rebuild at mark {result.mark} "
        f"({result.rebuilt_rows:,} rows){'; first: ' + first if first else ''}{stale}"
    )


def clean_message(result: VerifyResult) -> str:
    return (
        f"no drift: generation {result.live_generation} of {result.projection} equals a rebuild at mark "
        f"{result.mark} ({result.live_rows:,} rows)"
    )


def repair_message(result: RepairResult) -> str:
    """One line for the run's details and the CLI."""
    verb = "would change" if result.dry_run else "changed"
    first = ", ".join(f"{shorten(d.key, 80)} ({d.problem})" for d in result.first)
    stale = "; the live generation is STALE: the other keys keep the rows of its older code" if result.stale else ""
    return shorten(
        f"{result.projection}: {verb} {result.changed:,} of {result.keys:,} key(s) in generation {result.generation} "
        f"({result.events:,} events folded){'; ' + first if first else ''}{stale}"
    )
