"""Every bound rehydrate puts on an input, in one place: settings, the CLI, the starter, workflows and activities
check against these, so a value is refused the same way wherever it comes from."""

from __future__ import annotations

from rehydrate.core.errors import UserError

MAX_LANES = 256  # lanes of one replay: one checkpoint row, one concurrent chain of chunks each
MAX_PARALLEL = 500  # chunks of one replay running at once (Temporal: at most 2,000 pending activities per run)
MAX_PARTITIONS = 256  # partitions of one snapshot rebuild
# Keys one repair takes: they travel in its workflow input, which Temporal limits (2 MB by default).
MAX_REPAIR_KEYS = 50_000
MAX_SHOW = 1_000  # differing keys a verify result may name: it travels through Temporal
MAX_IDENTIFIER = 63  # Postgres identifiers (NAMEDATALEN - 1)


def check_range(name: str, value: int, low: int, high: int | None = None) -> int:
    """`value` if `low <= value <= high` (no upper bound when `high` is None), else a UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise UserError(f"{name}={value!r} is out of range", fix=f"use {bound}")
    return value


def check_rate(max_rate: object) -> float | None:
    """A replay's `max_rate`: None (no limit) or a positive number of events per second (else a UserError)."""
    if max_rate is None:
        return None
    if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)) or not max_rate > 0:
        raise UserError(
            f"max_rate={max_rate!r} is not a positive number of events per second",
            fix="give a number above 0, or leave it out (null) for no limit",
        )
    return float(max_rate)
