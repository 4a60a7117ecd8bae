"""Workflows: deterministic orchestration only, no database code."""

from rehydrate.workflows.replay import ReplayWorkflow, replay_workflow_id

__all__ = ["ReplayWorkflow", "replay_workflow_id"]
