"""Activities: the only code that talks to Postgres during a replay."""

from rehydrate.activities.replay import ReplayActivities

__all__ = ["ReplayActivities"]
