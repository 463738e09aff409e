"""OpenTelemetry tracing: spans exported in batches over OTLP/gRPC, W3C context on every hop."""

from __future__ import annotations

import logging

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.kit.buildinfo import build_version

log = logging.getLogger(__name__)


def configure_tracing(
    service: str,
    otlp_endpoint: str,
    sample_ratio: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> TracerProvider:
    """Install a global tracer provider; an empty endpoint records spans but exports none."""
    provider = TracerProvider(
        resource=Resource.create(
            {SERVICE_NAME: f"toolmesh-{service}", SERVICE_VERSION: build_version()}
        ),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if otlp_endpoint:
        # Batched and off the request path; a telemetry outage drops spans, never requests.
        exporter = OTLPSpanExporter(
            endpoint=otlp_endpoint,
            insecure=credentials is None,
            credentials=credentials,
            timeout=5,
        )
        provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=1000)
        )
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
