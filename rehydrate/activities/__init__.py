"""Activities: the only code a workflow runs that talks to Postgres. Each is a thin call into the engine, with the
activity's heartbeats, logs, metrics and spans around it."""

from rehydrate.activities.repair import RepairActivities
from rehydrate.activities.replay import ReplayActivities
from rehydrate.activities.snapshots import SnapshotActivities
from rehydrate.activities.tail import TailActivities, ensure_tail
from rehydrate.activities.verify import VerifyActivities

__all__ = [
    "RepairActivities",
    "ReplayActivities",
    "SnapshotActivities",
    "TailActivities",
    "VerifyActivities",
    "ensure_tail",
]
