"""Temporal's TracingInterceptor, less the progress polls; imported only with tracing on (it imports OpenTelemetry)."""

from __future__ import annotations

from typing import Any

from temporalio.client import OutboundInterceptor, QueryWorkflowInput
from temporalio.contrib.opentelemetry import TracingInterceptor

# `replay start --wait` (and the snapshot rebuild's) asks for progress every half second: traced, each poll would be
# a trace of its own in the collector, thousands for one long replay, hiding the replay's own trace.
UNTRACED_QUERIES = frozenset({"progress"})


class RehydrateTracingInterceptor(TracingInterceptor):
    """TracingInterceptor whose client sends progress queries untraced; everything else as Temporal traces it."""

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _UntracedProgress(super().intercept_client(next), untraced=next)


class _UntracedProgress(OutboundInterceptor):
    def __init__(self, traced: OutboundInterceptor, *, untraced: OutboundInterceptor) -> None:
        super().__init__(traced)
        self.untraced = untraced

    async def query_workflow(self, input: QueryWorkflowInput) -> Any:
        if input.query in UNTRACED_QUERIES:
            return await self.untraced.query_workflow(input)
        return await super().query_workflow(input)
