"""Activities: the only code that talks to Postgres during a replay or a tail."""

from rehydrate.activities.replay import ReplayActivities
from rehydrate.activities.snapshots import SnapshotActivities
from rehydrate.activities.tail import TailActivities
from rehydrate.activities.verify import VerifyActivities

__all__ = ["ReplayActivities", "SnapshotActivities", "TailActivities", "VerifyActivities"]
