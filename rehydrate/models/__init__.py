"""Inputs and outputs that travel through Temporal: names and numbers only, never events, never credentials."""

from rehydrate.models.replay import (
    CatchUpInput,
    CatchUpResult,
    ChunkInput,
    ChunkResult,
    GenerationRef,
    LaneState,
    Plan,
    PlanInput,
    ReplayInput,
    ReplayProgress,
    ReplayResult,
    ReplayState,
    SwapResult,
)
from rehydrate.models.tail import TailInput, TailRun, TailStatus

__all__ = [
    "CatchUpInput",
    "CatchUpResult",
    "ChunkInput",
    "ChunkResult",
    "GenerationRef",
    "LaneState",
    "Plan",
    "PlanInput",
    "ReplayInput",
    "ReplayProgress",
    "ReplayResult",
    "ReplayState",
    "SwapResult",
    "TailInput",
    "TailRun",
    "TailStatus",
]
