"""Workflows: deterministic orchestration of activities, no database code. Each is started with one JSON input (the
Temporal Web UI's start form sends exactly that)."""

from rehydrate.workflows.repair import RepairWorkflow
from rehydrate.workflows.replay import ReplayWorkflow
from rehydrate.workflows.snapshots import SnapshotRebuildWorkflow
from rehydrate.workflows.tail import TailWorkflow
from rehydrate.workflows.verify import VerifyWorkflow

__all__ = ["RepairWorkflow", "ReplayWorkflow", "SnapshotRebuildWorkflow", "TailWorkflow", "VerifyWorkflow"]
