# -*- test-case-name: tests.integration.test_tracing -*-
"""
One OpenTelemetry span per connection, when OpenTelemetry is there.

The gateway always propagates W3C trace context (headers.traceparent): an
incoming ``traceparent`` keeps its trace-id, else a new one is made, and the
upstream gets a ``traceparent`` of its own hop. Exporting spans is optional:
with the ``otel`` extra installed (``opentelemetry-sdk``) and the standard
``OTEL_TRACES_EXPORTER`` variable set to ``console`` or ``otlp``, each
connection becomes a span named ``websocket ROUTE`` whose parent is the
client's span and whose id is the parent-id the upstream sees. Without
either, ``NoTracer`` costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from wsgateway.handshake import headers

log = Logger()


class NoTracer:
    """Propagation only: the trace-id and the upstream's traceparent."""

    enabled = False

    def start(self, client_traceparent: str | None) -> tuple[Any, tuple[str, str]]:
        return None, headers.traceparent(client_traceparent)

    def end(self, span: Any, attributes: Mapping[str, Any], error: str | None = None) -> None:
        pass

    def shutdown(self) -> None:
        pass


class OtelTracer:
    """Spans through an OpenTelemetry TracerProvider of our own."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("wsgateway")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def start(self, client_traceparent: str | None) -> tuple[Any, tuple[str, str]]:
        carrier = {"traceparent": client_traceparent} if client_traceparent else {}
        parent = self._propagator.extract(carrier)
        span = self._tracer.start_span("websocket", context=parent, kind=self._trace.SpanKind.SERVER)
        out: dict[str, str] = {}
        self._propagator.inject(out, context=self._trace.set_span_in_context(span))
        ctx = span.get_span_context()
        return span, (out["traceparent"], format(ctx.trace_id, "032x"))

    def end(self, span: Any, attributes: Mapping[str, Any], error: str | None = None) -> None:
        if span is None:
            return
        route = attributes.get("wsgateway.route")
        if route:
            span.update_name(f"websocket {route}")
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()


def make_tracer(environ: Mapping[str, str] = os.environ) -> NoTracer | OtelTracer:
    """
    An exporting tracer when ``OTEL_TRACES_EXPORTER`` asks for one and the
    SDK is installed; a warning, and propagation only, when it asks but the
    SDK or the exporter package is missing.
    """
    wanted = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if wanted in ("", "none"):
        return NoTracer()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warn("OTEL_TRACES_EXPORTER={wanted} but opentelemetry-sdk is not installed "
                 "(pip install 'wsgateway[otel]'): spans are not exported", wanted=wanted)
        return NoTracer()
    exporter: Any
    if wanted == "console":
        exporter = ConsoleSpanExporter()
    elif wanted == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warn("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: spans are not exported")
            return NoTracer()
        exporter = OTLPSpanExporter()  # endpoint etc. from the standard OTEL_EXPORTER_OTLP_* variables
    else:
        log.warn("OTEL_TRACES_EXPORTER={wanted} is not supported (console, otlp): spans are not exported",
                 wanted=wanted)
        return NoTracer()
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "wsgateway")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("exporting a span per connection ({wanted})", wanted=wanted)
    return OtelTracer(provider)
