"""The names rehydrate's runs go by in Temporal: workflow types, workflow ids, task queues and sandbox labels.

Workflows, activities, the starter and schedules all address runs through these, so that a run started by one
(the CLI, a schedule, the Web UI) is found by the others.
"""

import hashlib

REPLAY = "Replay"
TAIL = "Tail"
VERIFY = "Verify"
REPAIR = "Repair"
SNAPSHOT_REBUILD = "SnapshotRebuild"

# The error type of a task that reached a worker that must not run it (it lacks the projection, or has other code
# for it than the run was planned with): workflows schedule such a task again instead of failing.
WRONG_WORKER = "WrongWorker"

# The error type of a verify that found drift: its run fails, with the result as the failure's details.
DRIFT = "Drift"

# The name of rehydrate's own event store as a source (every other source is named by its declaration).
OWN_SOURCE = "rehydrate"

# The value of the `rehydrate_replay_phase` gauge, in the order a replay goes through its phases.
REPLAY_PHASES = ("planning", "building", "finishing", "indexing", "catching_up", "swapping", "done")


# The task queue workers poll unless settings name another. A task queue is an installation of rehydrate: the
# workflow ids below start with it, so that two installations sharing one namespace (each on its own queue) never
# take each other's ids; on this default queue the ids start with "rehydrate".
DEFAULT_TASK_QUEUE = "rehydrate"


def id_prefix(task_queue: str | None = None) -> str:
    """What every workflow id of the installation on `task_queue` starts with (None: the default queue)."""
    return task_queue or DEFAULT_TASK_QUEUE


def replay_workflow_id(projection: str, sandbox: str | None = None, task_queue: str | None = None) -> str:
    """The fixed workflow id of a projection's replay: one replay per projection at a time (and one per
    projection and sandbox label: a sandbox build does not block the live replay)."""
    prefix = id_prefix(task_queue)
    return f"{prefix}-sandbox-{sandbox}-{projection}" if sandbox else f"{prefix}-replay-{projection}"


def tail_workflow_id(projection: str, task_queue: str | None = None) -> str:
    """The fixed workflow id of a projection's tail: at most one runs."""
    return f"{id_prefix(task_queue)}-tail-{projection}"


def verify_workflow_id(projection: str, task_queue: str | None = None) -> str:
    """The fixed workflow id of `rehydrate verify NAME`: one verify per projection at a time from the CLI."""
    return f"{id_prefix(task_queue)}-verify-{projection}"


def repair_workflow_id(projection: str, task_queue: str | None = None) -> str:
    """The fixed workflow id of a projection's repair: one at a time per projection."""
    return f"{id_prefix(task_queue)}-repair-{projection}"


def snapshot_workflow_id(aggregate_type: str, task_queue: str | None = None) -> str:
    """The fixed workflow id of an aggregate type's snapshot rebuild: one at a time per type."""
    return f"{id_prefix(task_queue)}-snapshots-{aggregate_type}"


def scheduled_workflow_id(projection: str, kind: str = "replay", task_queue: str | None = None) -> str:
    """The prefix of a scheduled replay's (or verify's) workflow id (Temporal appends the scheduled time)."""
    return f"{id_prefix(task_queue)}-scheduled-{kind}-{projection}"


def tail_task_queue(task_queue: str) -> str:
    """The task queue of the tail activities of workers on `task_queue`: tails run for minutes, so they get
    slots of their own and never take the slots that size a worker's replay chunks to its core."""
    return f"{task_queue}.tails"


MAX_SANDBOX_LABEL = 45  # rehydrate_sandbox_<label> within Postgres's 63-byte identifiers


def verify_label(projection: str) -> str:
    """The sandbox a verify rebuilds into (schema `rehydrate_sandbox_verify_<projection>`). A long name is cut and
    ends with a hash of the whole name, so that two projections whose names start alike never share a sandbox."""
    label = f"verify_{projection}"
    if len(label) <= MAX_SANDBOX_LABEL:
        return label
    digest = hashlib.sha1(projection.encode()).hexdigest()[:8]
    return f"{label[: MAX_SANDBOX_LABEL - 9]}_{digest}"
