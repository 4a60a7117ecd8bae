"""The bulk snapshot rebuild's input, carried state, progress, and its activities' inputs and outputs."""

from dataclasses import dataclass, field


@dataclass
class PartitionState:
    """One hash partition of the aggregate type's streams: the last stream id done (keyset cursor)."""

    partition: int
    after_stream: str | None = None
    streams_done: int = 0
    done: bool = False


@dataclass
class SnapshotRebuildState:
    """What a rebuild carries across continue-as-new: names and numbers only."""

    rebuild_id: str
    partitions: list[PartitionState]
    streams_total: int
    chunk_size: int
    started_at: str
    chunks_done: int = 0
    runs: int = 1


@dataclass
class SnapshotRebuildInput:
    """Start a rebuild: `{"aggregate_type": "order"}` is a complete input (e.g. from the Temporal Web UI)."""

    aggregate_type: str
    partitions: int = 4
    chunk_size: int = 500
    heartbeat_timeout_seconds: float = 30.0
    state: SnapshotRebuildState | None = None


@dataclass
class SnapshotPlanInput:
    aggregate_type: str
    rebuild_id: str
    partitions: int


@dataclass
class SnapshotPlan:
    streams_total: int
    partitions: list[PartitionState]


@dataclass
class SnapshotChunkInput:
    aggregate_type: str
    rebuild_id: str
    partition: int
    partitions: int
    chunk_size: int


@dataclass
class SnapshotChunkResult:
    after_stream: str | None
    streams_done: int
    chunk_streams: int
    done: bool


@dataclass
class SnapshotRebuildProgress:
    aggregate_type: str
    phase: str
    streams_done: int = 0
    streams_total: int = 0
    partitions: list[PartitionState] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    rate: float = 0.0
    eta_seconds: float | None = None
    runs: int = 1


@dataclass
class SnapshotRebuildResult:
    aggregate_type: str
    rebuild_id: str
    streams: int
    seconds: float
    streams_per_second: float
    runs: int
