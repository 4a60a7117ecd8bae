"""Tracing's set-up: off imports nothing, a missing package names the extra, the OTLP exporter follows OTEL_*."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from rehydrate.core import tracing
from rehydrate.core.errors import UserError
from rehydrate.core.settings import Settings
from rehydrate.core.temporal import connect_client


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each request it is sent."""

    received: list[tuple[str, str | None, ExportTraceServiceRequest]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append((self.path, self.headers["x-team"], request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_tracing_off_does_not_even_import_opentelemetry() -> None:
    code = (
        "import sys, asyncio\n"
        "import rehydrate.cli, rehydrate.worker, rehydrate.activities, rehydrate.core.tracing\n"
        "from rehydrate.core.settings import Settings\n"
        "assert rehydrate.core.tracing.interceptors(Settings()) == []\n"
        "with rehydrate.core.tracing.span('chunk', lane=0) as span: assert span is None\n"
        "rehydrate.core.tracing.annotate(lane=0); rehydrate.core.tracing.flush()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_tracing_without_the_packages_names_the_extra_to_install(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("opentelemetry", "temporalio.contrib.opentelemetry", "rehydrate.core.tracing_interceptor"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError) as raised:
        await connect_client(settings.model_copy(update={"tracing": "otlp"}))
    assert "pip install 'rehydrate[otel]'" in str(raised.value)
    assert "REHYDRATE_TRACING=otlp" in str(raised.value)


@pytest.mark.parametrize("service", [None, "orders-rebuilds"])
async def test_otlp_exporter_sends_to_the_endpoint_and_service_the_otel_variables_name(
    monkeypatch: pytest.MonkeyPatch, service: str | None
) -> None:
    handler = type("Collector", (_Collector,), {"received": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=rebuilds")
        if service:
            monkeypatch.setenv("OTEL_SERVICE_NAME", service)
        else:
            monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
            monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        provider = tracing.tracer_provider("otlp")
        with provider.get_tracer("test").start_as_current_span("rehydrate.chunk", attributes={"rehydrate.lane": 1}):
            pass
        assert await asyncio.to_thread(provider.force_flush)
        provider.shutdown()
    finally:
        server.shutdown()
    [(path, team, request)] = handler.received
    assert (path, team) == ("/v1/traces", "rebuilds")
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == (service or "rehydrate")
    [sent] = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert sent.name == "rehydrate.chunk"
    assert [(a.key, a.value.int_value) for a in sent.attributes] == [("rehydrate.lane", 1)]


def test_an_unknown_otlp_protocol_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(UserError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        tracing.tracer_provider("otlp")
