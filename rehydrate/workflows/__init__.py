"""Workflows: deterministic orchestration of activities, no database code. Each is started with one JSON input (the
Temporal Web UI's start form sends exactly that).

A workflow's module imports its activities (to name them) and, through them, the engine and asyncpg. Each workflow
is imported when first used (PEP 562), so that `messages` (the one line a result is printed as) comes without all
that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rehydrate.workflows' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next use is a plain lookup
    return value
