"""Forward received spans to another OTLP/gRPC endpoint (a Collector), off the ingest path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger(__name__)

_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_ATTEMPTS = 3
_TIMEOUT_S = 5.0


class Forwarder:
    """A bounded queue of export requests drained by one background task.

    Ingest only enqueues; a full queue or a collector that keeps failing drops batches and
    counts them, so a slow collector can never slow down or fail an Export to us.
    """

    def __init__(self, endpoint: str, max_batches: int) -> None:
        self._endpoint = endpoint
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_batches)
        self.dropped_batches = 0
        self.forwarded_batches = 0

    def offer(self, request: bytes) -> None:
        """Queue a serialized ExportTraceServiceRequest; never waits."""
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.dropped_batches += 1

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
                self.dropped_batches += 1
                log.warning(
                    "forward failed, batch dropped",
                    extra={"code": error.code().name, "dropped_batches": self.dropped_batches},
                )
                return
            self.forwarded_batches += 1
            return
