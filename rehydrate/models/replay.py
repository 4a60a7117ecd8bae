"""The replay workflow's input, its carried state, its progress, and its activities' inputs and outputs."""

from dataclasses import dataclass, field


@dataclass
class LaneState:
    lane: int
    position: int = 0
    applied: int = 0
    total: int = 0
    done: bool = False
    # The lanes that must be done before this one starts (a resharded Kinesis stream's parent shards).
    after: list[int] = field(default_factory=list)


@dataclass
class ReplayState:
    """What a replay carries across continue-as-new: numbers and names only."""

    generation: int
    physical_table: str
    mark: int
    lanes: list[LaneState]
    chunk_size: int
    max_parallel: int
    events_total: int
    started_at: str
    phase: str = "building"
    chunks_done: int = 0
    runs: int = 1
    search_attributes: bool = False
    paused: bool = False
    paused_seconds: float = 0.0  # time spent paused, left out of the rate and the ETA
    source: str = "rehydrate"  # the event source read (its name)
    tables: list[str] = field(default_factory=list)  # the generation's tables, the main one first
    max_rate: float | None = None  # events per second the build may apply, over all lanes (None: no limit)


@dataclass
class ReplayInput:
    """Start a replay: `{"projection": "order_summary"}` is a complete input (e.g. from the Temporal Web UI).

    Unset tuning values take the worker's settings (REHYDRATE_LANES, REHYDRATE_CHUNK_SIZE, …).
    `skip_if_running` (set by schedules) ends the run successfully, as skipped, when another replay of the
    projection is building; otherwise that is an error. `state` is for continue-as-new only.
    """

    projection: str
    lanes: int | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    catch_up_threshold: int = 1_000
    # A chunk heartbeats about every second, and the longer steps (plan, indexes, ANALYZE, catch-up) every third of
    # this: a worker that dies inside one is noticed after this long, and the step runs again on another worker a
    # retry interval (1 s) later.
    heartbeat_timeout_seconds: float = 8.0
    skip_if_running: bool = False
    state: ReplayState | None = None
    sandbox: str | None = None  # build into schema rehydrate_sandbox_<label>, never swap
    to_position: int | None = None  # sandbox only: events at or before this global position
    as_of: str | None = None  # sandbox only: events recorded at or before this ISO timestamp (naive: UTC)
    mark: int | None = None  # sandbox only: the target high-water mark (verify sets it); default: the current one
    allow_dead_letters: bool = False  # swap even though the projection parked events
    # A Kafka source whose start retention deleted (or that is compacted): build from what it still holds anyway.
    accept_partial_history: bool = False
    # At most this many events per second over all lanes (None: as fast as the workers go), to spare a database that
    # also serves live traffic; changed while it runs by the update `set_max_rate` (`rehydrate replay tune`).
    max_rate: float | None = None
    # How long a step may wait for a worker that can run it (one that serves the projection with the code the
    # generation is built with) before the replay fails, naming the workers it met.
    wrong_worker_patience_seconds: float = 300.0


@dataclass
class PlanInput:
    projection: str
    workflow_id: str
    run_id: str
    lanes: int | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    skip_if_running: bool = False
    sandbox: str | None = None
    to_position: int | None = None
    as_of: str | None = None
    mark: int | None = None
    accept_partial_history: bool = False


@dataclass
class Plan:
    generation: int
    physical_table: str
    mark: int
    lanes: list[LaneState]
    chunk_size: int
    max_parallel: int
    events_total: int
    search_attributes: bool = False  # RehydrateProjection & co. are registered: the workflow may upsert them
    source: str = "rehydrate"  # the event source the generation is built from (its name)
    tables: list[str] = field(default_factory=list)  # the generation's tables, the main one first
    running_elsewhere: str | None = None  # with skip_if_running: the workflow id already building, nothing made


@dataclass
class ChunkInput:
    projection: str
    generation: int
    lane: int
    lanes: int
    mark: int
    chunk_size: int
    # Under a replay's max_rate: the events per second this chunk applies at most, spread over its slices.
    max_rate: float | None = None


@dataclass
class ChunkResult:
    position: int
    applied: int
    chunk_events: int
    done: bool


@dataclass
class GenerationRef:
    projection: str
    generation: int
    reason: str = ""
    allow_dead_letters: bool = False


@dataclass
class CatchUpInput:
    projection: str
    generation: int


@dataclass
class CatchUpResult:
    applied: int
    mark: int


@dataclass
class SwapResult:
    generation: int
    previous_generation: int | None
    final_delta: int
    lock_ms: float
    rows: int
    dropped_generations: list[int] = field(default_factory=list)
    # An earlier attempt committed this swap and lost its result: the figures above are that attempt's.
    committed_before: bool = False


@dataclass
class ReplayProgress:
    projection: str
    phase: str
    generation: int | None = None
    events_applied: int = 0
    events_total: int = 0
    caught_up: int = 0
    lanes: list[LaneState] = field(default_factory=list)
    started_at: str | None = None
    elapsed_seconds: float = 0.0  # since the start, pauses included
    paused_seconds: float = 0.0
    rate: float = 0.0  # events per second of running time (pauses left out)
    eta_seconds: float | None = None
    runs: int = 1
    paused: bool = False
    max_parallel: int = 0
    tables: list[str] = field(default_factory=list)
    max_rate: float | None = None

    def counts(self) -> str:
        """Events applied of total, the share, the rate and, while it runs, the ETA: what the CLI's status and the
        Web UI's details both show."""
        rate = f"{self.rate:,.0f} events/s"
        if self.events_applied > self.events_total or (self.events_total == 0 and self.phase == "building"):
            # The total is not known (a log whose ends were open at plan time), or was estimated low from a sample:
            # it is known once every lane is done. Neither a share nor an ETA can be told meanwhile.
            return f"{self.events_applied:,} events (the total is known once every lane is done), {rate}"
        percent = 100 * self.events_applied / self.events_total if self.events_total else 100.0
        eta = "" if self.paused or self.eta_seconds is None else f", ETA {self.eta_seconds:,.0f} s"
        return f"{self.events_applied:,} of {self.events_total:,} events ({percent:.0f}%), {rate}{eta}"

    def summary(self) -> str:
        """One line: the phase (or paused), the generation and `counts()`."""
        state = "paused" if self.paused else f"phase {self.phase}"
        throttled = f" (throttled to {self.max_rate:,.0f} events/s)" if self.max_rate else ""
        return f"{state}, generation {self.generation}{throttled}: {self.counts()}"


@dataclass
class ReplayResult:
    projection: str
    generation: int
    previous_generation: int | None
    events_applied: int
    caught_up: int
    rows: int
    seconds: float
    events_per_second: float
    swap_lock_ms: float
    runs: int
    skipped: str | None = None  # why nothing was built (a scheduled run found another replay building)
    sandbox: str | None = None  # the sandbox label of a sandbox build (nothing swapped)
    dead_letters: int = 0  # events the generation parked (on_error="park")

    def describe(self) -> str:
        """One line: what the replay built, and how fast."""
        if self.skipped:
            return f"{self.projection}: {self.skipped}"
        speed = f"{self.events_applied:,} events in {self.seconds:.1f} s ({self.events_per_second:,.0f} events/s)"
        if self.sandbox:
            return (
                f"{self.projection}: sandbox {self.sandbox} built (generation {self.generation}), live read model "
                f"untouched — {speed}, {self.rows:,} rows, {self.dead_letters:,} parked"
            )
        previous = f" (was g{self.previous_generation})" if self.previous_generation else ""
        return (
            f"{self.projection}: generation {self.generation} active{previous} — {speed}, {self.rows:,} rows, "
            f"{self.caught_up:,} caught up, swap lock {self.swap_lock_ms:.1f} ms"
        )
