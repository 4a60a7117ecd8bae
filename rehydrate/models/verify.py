"""The verify workflow's input and result, and its activities' inputs and outputs."""

from dataclasses import dataclass, field


@dataclass
class VerifyInput:
    """Verify a projection: `{"projection": "order_summary"}` is a complete input (e.g. from the Temporal Web UI).

    The projection is rebuilt into the sandbox `verify_<projection>` at the live generation's checkpoint and
    compared with the live generation key by key. `keep` keeps that sandbox; `show` is how many differing keys the
    result names. `lanes`, `chunk_size`, `max_parallel` tune the sandbox rebuild (unset: the worker's settings).
    `skip_if_running` (set by schedules) ends the run successfully, as skipped, when a replay of the projection is
    building or another verify of it runs; otherwise those are errors (a building replay is not: the comparison
    is then made with whichever generation is live when it runs).
    """

    projection: str
    keep: bool = False
    show: int = 5
    lanes: int | None = None
    chunk_size: int | None = None
    max_parallel: int | None = None
    skip_if_running: bool = False
    # How long a step waits for a worker that serves the projection (with the live generation's code) before the
    # verify fails, naming the last worker it met.
    wrong_worker_patience_seconds: float = 300.0


@dataclass
class Drift:
    key: str
    problem: str  # "differs", "missing in live", "missing in rebuild"


@dataclass
class VerifyResult:
    """What a verify found. A run with drift ends FAILED (error type "Drift") with this as the error's details."""

    projection: str
    live_generation: int
    sandbox_generation: int
    mark: int  # the live checkpoint both tables were compared at
    live_rows: int
    rebuilt_rows: int
    differing: int
    first: list[Drift] = field(default_factory=list)
    stale: bool = False  # the live generation was built from other projection code: drift is expected
    skipped: str | None = None  # why nothing was compared (a scheduled run found a replay or a verify running)
    sandbox: str | None = None  # the sandbox label, when it was kept (`keep`)
    seconds: float = 0.0


@dataclass
class VerifyStartInput:
    projection: str
    skip_if_running: bool = False
    show: int = 5


@dataclass
class VerifyStart:
    live_generation: int
    mark: int  # the live generation's checkpoint: the sandbox is rebuilt at exactly this mark
    search_attributes: bool = False
    running_elsewhere: str | None = None  # with skip_if_running: the workflow building the projection
    # The sandbox rebuild's workflow id, which starts with the worker's task queue (a run that began on a release
    # that did not send it uses the id without the queue that it started its child under).
    rebuild_workflow_id: str | None = None


@dataclass
class VerifyCompareInput:
    projection: str
    sandbox: str
    sandbox_generation: int
    show: int = 5
