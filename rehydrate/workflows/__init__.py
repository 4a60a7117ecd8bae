"""Workflows: deterministic orchestration only, no database code."""

from rehydrate.workflows.replay import ReplayWorkflow, replay_workflow_id
from rehydrate.workflows.snapshots import SnapshotRebuildWorkflow, snapshot_workflow_id
from rehydrate.workflows.tail import TailWorkflow, tail_task_queue, tail_workflow_id
from rehydrate.workflows.verify import VerifyWorkflow, verify_workflow_id

__all__ = [
    "ReplayWorkflow",
    "SnapshotRebuildWorkflow",
    "TailWorkflow",
    "VerifyWorkflow",
    "replay_workflow_id",
    "snapshot_workflow_id",
    "tail_task_queue",
    "tail_workflow_id",
    "verify_workflow_id",
]
