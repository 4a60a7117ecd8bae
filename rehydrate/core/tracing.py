"""Optional OpenTelemetry tracing: Temporal's TracingInterceptor on clients and workers, plus rehydrate's own spans.

Off by default, and then free: no interceptor, no OpenTelemetry import, `span()` a shared no-op context. On
(`REHYDRATE_TRACING=otlp`, `worker --tracing otlp`; needs `pip install 'rehydrate[otel]'`), every client that
`temporal.connect_client` makes carries the interceptor, and so does every worker built on such a client: the
trace context travels in Temporal headers, so `replay start` → the Replay workflow → its activities (across
continue-as-new) form one trace (the `--wait` progress polls are left out). The exporter is configured by the
standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, ...).

rehydrate's spans (`rehydrate.chunk`, `rehydrate.catch_up`, `rehydrate.swap`) are children of Temporal's
`RunActivity:…` spans and carry `rehydrate.*` attributes; they are made only inside a traced activity. Workflow
code makes no spans of its own: the interceptor records the workflow's, replay-safely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from rehydrate.core.errors import UserError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from temporalio.client import Interceptor

    from rehydrate.core.settings import Settings

INSTALL = "pip install 'rehydrate[otel]'"
DEFAULT_SERVICE_NAME = "rehydrate"
PREFIX = "rehydrate."

_enabled = False  # set once a client of this process was given the interceptor
_provider: TracerProvider | None = None  # the provider rehydrate installed (None: none, or the application's own)
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()


def interceptors(settings: Settings) -> list[Interceptor]:
    """The client interceptors tracing asks for: none when off; else Temporal's TracingInterceptor, which a
    worker built on the client uses too. Installs a tracer provider from the OTEL_* variables, unless the process
    already has one (an application that embeds rehydrate and configured OpenTelemetry itself)."""
    global _enabled
    if settings.tracing == "off":
        return []
    try:
        from opentelemetry import trace

        from rehydrate.core.tracing_interceptor import RehydrateTracingInterceptor
    except ImportError as error:
        raise UserError(
            f"REHYDRATE_TRACING={settings.tracing} needs OpenTelemetry, which is not installed ({error.name or error})",
            fix=f"{INSTALL}, or set REHYDRATE_TRACING=off",
        ) from None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # none set in this process yet
        install(tracer_provider(settings.tracing))
    _enabled = True
    # A replay started without a trace (from the Web UI, by a schedule) gets no workflow spans: each of its
    # activities is a trace of its own, found by its temporalWorkflowID attribute. (always_create_workflow_spans
    # would add the workflow's spans, but as roots of their own traces, none joined to the activities'.)
    return [RehydrateTracingInterceptor(trace.get_tracer("rehydrate"))]


def tracer_provider(kind: str) -> TracerProvider:
    """A tracer provider exporting to OTLP (http/protobuf, or grpc when OTEL_EXPORTER_OTLP_PROTOCOL says so and
    its exporter is installed) or to the console, configured by the OTEL_* variables; service name `rehydrate`
    unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one."""
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as error:
        raise UserError(
            f"REHYDRATE_TRACING={kind} needs the OpenTelemetry SDK, which is not installed ({error.name or error})",
            fix=INSTALL,
        ) from None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    exporter: SpanExporter = ConsoleSpanExporter() if kind == "console" else _otlp_exporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter() -> Any:
    import os

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            return Grpc()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
    except ImportError as error:
        fix = INSTALL
        if protocol == "grpc":
            fix = "pip install opentelemetry-exporter-otlp-proto-grpc, or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
        raise UserError(
            f"the OTLP {protocol} span exporter is not installed ({error.name or error})", fix=fix
        ) from None
    if protocol != "http/protobuf":
        raise UserError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported",
            fix="use http/protobuf (the default) or grpc",
        )
    return Http()


def install(provider: TracerProvider) -> None:
    """Make `provider` this process's tracer provider; `flush` exports what it still holds."""
    global _provider
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    _provider = provider


def flush() -> None:
    """Export the spans still batched in the provider rehydrate installed: the CLI leaves with os._exit, which
    runs no exit handler."""
    if _provider is not None:
        _provider.force_flush()


def _current() -> Span | None:
    """The current span, when it is recording (a traced activity's); None otherwise."""
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Span | None]:
    """A `rehydrate.<name>` span with `rehydrate.<key>` attributes, child of the current one; a no-op context
    (yielding None) when tracing is off or outside a traced activity."""
    if not _enabled or _current() is None:
        return _NO_SPAN
    return _span(name, attributes)


@contextlib.contextmanager
def _span(name: str, attributes: dict[str, str | int | float | bool]) -> Iterator[Span]:
    from opentelemetry import trace

    tracer = trace.get_tracer("rehydrate")
    with tracer.start_as_current_span(PREFIX + name, attributes=_prefixed(attributes)) as current:
        yield current


def annotate(**attributes: str | int | float | bool) -> None:
    """Add `rehydrate.<key>` attributes to the current span (rehydrate's own), if tracing."""
    if _enabled and (current := _current()) is not None:
        current.set_attributes(_prefixed(attributes))


def event(name: str, **attributes: str | int | float | bool) -> None:
    """Record a point in time (a swap that found its lock busy) on the current span, if tracing."""
    if _enabled and (current := _current()) is not None:
        current.add_event(name, _prefixed(attributes))


def _prefixed(attributes: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
    return {PREFIX + key: value for key, value in attributes.items()}
