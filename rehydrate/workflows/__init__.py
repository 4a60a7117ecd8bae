"""Workflows: deterministic orchestration of activities, no database code. Each is started with one JSON input (the
Temporal Web UI's start form sends exactly that).

A workflow's module imports its activities (to name them) and, through them, the engine and asyncpg. Each workflow
is imported when first used (PEP 562), so that `messages` (the one line a result is printed as) comes without all
that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rehydrate.core.lazy import lazy_names

if TYPE_CHECKING:
    from rehydrate.workflows.repair import RepairWorkflow
    from rehydrate.workflows.replay import ReplayWorkflow
    from rehydrate.workflows.snapshots import SnapshotRebuildWorkflow
    from rehydrate.workflows.tail import TailWorkflow
    from rehydrate.workflows.verify import VerifyWorkflow

# Where each workflow lives.
_HOMES = {
    "RepairWorkflow": "rehydrate.workflows.repair",
    "ReplayWorkflow": "rehydrate.workflows.replay",
    "SnapshotRebuildWorkflow": "rehydrate.workflows.snapshots",
    "TailWorkflow": "rehydrate.workflows.tail",
    "VerifyWorkflow": "rehydrate.workflows.verify",
}

__all__ = ["RepairWorkflow", "ReplayWorkflow", "SnapshotRebuildWorkflow", "TailWorkflow", "VerifyWorkflow"]


__getattr__ = lazy_names(__name__, _HOMES, globals())
