"""Forward received spans to another OTLP/gRPC endpoint (a Collector), off the ingest path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc import aio

from services.kit.metrics import meter

log = logging.getLogger(__name__)

_FORWARDED = meter().create_counter(
    "toolmesh.telemetry.forwarded_batches", unit="{batch}", description="Exports forwarded"
)
_DROPPED = meter().create_counter(
    "toolmesh.telemetry.forward_dropped_batches",
    unit="{batch}",
    description="Exports not forwarded: queue full or the endpoint kept failing",
)

_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_ATTEMPTS = 3
_TIMEOUT_S = 5.0


class Forwarder:
    """A bounded queue of export requests drained by one background task.

    Ingest only enqueues; a full queue or a collector that keeps failing drops batches and
    counts them (metrics above), so a slow collector can never slow down or fail an Export to us.
    """

    def __init__(self, endpoint: str, max_batches: int) -> None:
        self._endpoint = endpoint
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_batches)

    def offer(self, request: bytes) -> None:
        """Queue a serialized ExportTraceServiceRequest; never waits."""
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            _DROPPED.add(1, {"reason": "queue_full"})

    async def run(self) -> None:
        # A plain channel: the target is an OpenTelemetry Collector, not a toolmesh service,
        # and tracing these calls would only make spans about forwarding spans.
        async with aio.insecure_channel(self._endpoint) as channel:
            # Bytes in, bytes out: the request is sent exactly as it was received.
            export = channel.unary_unary(_EXPORT)
            while True:
                request = await self._queue.get()
                await self._send(export, request)

    async def _send(self, export: Any, request: bytes) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                await export(request, timeout=_TIMEOUT_S)
            except aio.AioRpcError as error:
                retryable = error.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
                if retryable and attempt < _ATTEMPTS:
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                _DROPPED.add(1, {"reason": error.code().name})
                log.warning("forward failed, batch dropped", extra={"code": error.code().name})
                return
            _FORWARDED.add(1)
            return
