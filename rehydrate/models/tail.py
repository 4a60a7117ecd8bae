"""The tail workflow's input, its activity's result and its status."""

from dataclasses import dataclass


@dataclass
class TailInput:
    """Keep `projection`'s active read model current: `{"projection": "order_summary"}` is a complete input.

    The activity returns after `run_seconds` (the workflow starts it again), so that a long-lived tail's history
    stays short; counters are carried across continue-as-new.
    """

    projection: str
    batch_size: int = 5_000
    poll_seconds: float = 1.0
    run_seconds: float = 300.0
    heartbeat_timeout_seconds: float = 20.0
    events_applied: int = 0
    batches: int = 0


@dataclass
class TailRun:
    events_applied: int
    batches: int
    generation: int | None
    checkpoint: int | None


@dataclass
class TailStatus:
    projection: str
    events_applied: int
    batches: int
    generation: int | None
    checkpoint: int | None
    runs: int
