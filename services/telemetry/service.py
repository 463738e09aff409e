"""The Telemetry servicer and the OTLP TraceService on the same port, plus background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid
from services.kit.metrics import meter
from services.kit.server import Cleanup, Register
from services.kit.settings import ServiceSettings
from services.telemetry import spans
from services.telemetry.forward import Forwarder
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats import summarize
from services.telemetry.store import SpanRow, SpanStore
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger(__name__)

CONTRACT_VERSIONS = ["toolmesh.telemetry.v1", "opentelemetry.proto.collector.trace.v1"]

DEFAULT_WINDOW_S = 3600
MAX_WINDOW_S = 30 * 24 * 3600
# An Export naming hundreds of bad spans gets the first few, enough to find the bug.
MAX_REPORTED_VIOLATIONS = 10
TRACE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

_SPANS_STORED = meter().create_counter(
    "toolmesh.telemetry.spans_stored", unit="{span}", description="Spans accepted over OTLP"
)

_GROUPINGS = {
    telemetry_pb2.STATS_GROUP_BY_SERVICE: "service",
    telemetry_pb2.STATS_GROUP_BY_ROUTE: "route",
    telemetry_pb2.STATS_GROUP_BY_TOOL: "tool",
}


def _timestamp(nanos: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def _row_keys(grouping: str, key: tuple[str, ...], service: str) -> dict[str, str]:
    if grouping == "service":
        return {"service": key[0]}
    if grouping == "route":
        return {"service": key[0], "route": key[1]}
    return {"service": service, "tool_name": key[0], "tool_version": key[1]}


def _trace_span(row: SpanRow) -> Any:
    span = telemetry_pb2.TraceSpan(
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        service=row.service,
        name=row.name,
        kind=telemetry_pb2.SpanKind.Name(row.kind),
        start_time=_timestamp(row.start_ns),
        duration_ms=row.duration_ms,
        error=row.error,
        attributes_json=row.attributes_json,
        route=row.route,
        tool_name=row.tool_name,
        tool_version=row.tool_version,
        tenant=row.tenant,
    )
    if row.grpc_status_code is not None:
        span.grpc_status_code = row.grpc_status_code
    return span


class TraceService:
    """Standard OTLP/gRPC span ingest: decode, insert in one transaction, answer.

    Registered with a pass-through deserializer (not through the generated TraceServiceServicer
    registration) so that bytes that are no ExportTraceServiceRequest get INVALID_ARGUMENT
    rather than grpc's UNKNOWN, and so forwarding sends the received bytes unchanged.
    """

    SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name

    def __init__(self, store: SpanStore, forwarder: Forwarder | None) -> None:
        self._store = store
        self._forwarder = forwarder

    def add_to_server(self, server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, {"Export": handler}),)
        )

    async def Export(self, raw: bytes, context: aio.ServicerContext) -> Any:
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except DecodeError:
            await abort_invalid(context, [("request", "not an ExportTraceServiceRequest")])
        records, violations = spans.decode(request)
        if violations:
            await abort_invalid(context, violations[:MAX_REPORTED_VIOLATIONS])
        if records:
            await self._store.insert(records)
            _SPANS_STORED.add(len(records))
            if self._forwarder is not None:
                self._forwarder.offer(raw)
        return trace_service_pb2.ExportTraceServiceResponse()


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServicer):
    def __init__(self, settings: TelemetrySettings, store: SpanStore) -> None:
        self._settings = settings
        self._store = store

    async def GetStats(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = []
        grouping = _GROUPINGS.get(request.group_by)
        if grouping is None:
            violations.append(("group_by", "choose SERVICE, ROUTE or TOOL"))
        if not 0 <= request.window_seconds <= MAX_WINDOW_S:
            violations.append(("window_seconds", f"between 0 and {MAX_WINDOW_S} (30 days)"))
        if violations or grouping is None:
            await abort_invalid(context, violations)
        window_s = request.window_seconds or DEFAULT_WINDOW_S
        end_ns = time.time_ns()
        start_ns = end_ns - window_s * 1_000_000_000
        samples = await self._store.samples(grouping, start_ns, end_ns, request.service)
        rows = [
            telemetry_pb2.StatsRow(
                **_row_keys(grouping, group.key, request.service),
                count=group.count,
                errors=group.errors,
                error_rate=group.error_rate,
                mean_ms=group.mean_ms,
                p50_ms=group.p50_ms,
                p95_ms=group.p95_ms,
                p99_ms=group.p99_ms,
            )
            for group in summarize(samples)
        ]
        return telemetry_pb2.GetStatsResponse(
            rows=rows, window_start=_timestamp(start_ns), window_end=_timestamp(end_ns)
        )

    async def GetTrace(self, request: Any, context: aio.ServicerContext) -> Any:
        trace_id = request.trace_id.lower()
        if not TRACE_ID_PATTERN.fullmatch(trace_id) or trace_id == "0" * 32:
            await abort_invalid(context, [("trace_id", "32 hexadecimal characters, not all 0")])
        rows = await self._store.trace(trace_id)
        if not rows:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no span of this trace is stored")
        return telemetry_pb2.GetTraceResponse(
            trace_id=trace_id, spans=[_trace_span(row) for row in rows]
        )

    async def GetServiceInfo(self, request: Any, context: aio.ServicerContext) -> Any:
        return telemetry_pb2.GetServiceInfoResponse(
            info=service_info(self._settings.service_name, CONTRACT_VERSIONS)
        )


async def _prune_forever(store: SpanStore, settings: TelemetrySettings) -> None:
    """Delete spans past retention now and then every prune_interval_s; errors only log."""
    retention_ns = int(settings.retention_hours * 3600 * 1e9)
    while True:
        try:
            deleted = await store.prune(time.time_ns() - retention_ns)
            if deleted:
                log.info("pruned spans", extra={"deleted": deleted})
        except Exception:
            log.exception("pruning spans failed")
        await asyncio.sleep(settings.prune_interval_s)


def _background(coroutine: Awaitable[None]) -> Cleanup:
    task = asyncio.ensure_future(coroutine)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return cancel


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Open the store and start the background tasks inside the server's event loop."""
    if not isinstance(settings, TelemetrySettings):
        raise TypeError("telemetry needs TelemetrySettings")

    async def register(server: aio.Server) -> Sequence[str]:
        store = SpanStore(settings.resolved_database_url())
        await store.migrate()
        cleanups.append(store.close)
        forwarder = None
        if settings.forward_otlp_endpoint:
            forwarder = Forwarder(settings.forward_otlp_endpoint, settings.forward_queue_batches)
            cleanups.append(_background(forwarder.run()))
        cleanups.append(_background(_prune_forever(store, settings)))
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(
            TelemetryServicer(settings, store), server
        )
        TraceService(store, forwarder).add_to_server(server)
        return [
            telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"].full_name,
            TraceService.SERVICE,
        ]

    return register
