"""Telemetry's own spans, stored straight into its own span store.

Exporting them over OTLP to itself would loop (every Export is a span that is exported...), so
telemetry has no OTLP endpoint. Without its spans, though, a request's trace would stop at its
door (a budget reservation on the Run path would be missing). This exporter writes them to the
store directly, leaving out the spans of span ingest itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from services.telemetry import spans
from services.telemetry.store import SpanStore

log = logging.getLogger(__name__)

INGEST_SPAN = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class LocalSpanExporter(SpanExporter):
    """Called on the batch processor's thread; inserts on the server's event loop."""

    def __init__(
        self, store: SpanStore, loop: asyncio.AbstractEventLoop, *, keep_every_trace: bool
    ) -> None:
        self._store = store
        self._loop = loop
        self._keep_every_trace = keep_every_trace
        self._closed = False

    async def close(self) -> None:
        """The store is closing: spans that end after this are dropped, not exported."""
        self._closed = True

    def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        wanted = [span for span in batch if span.name != INGEST_SPAN]
        if not wanted or self._closed or self._loop.is_closed():
            return SpanExportResult.SUCCESS
        records, violations = spans.decode(encode_spans(wanted))
        if violations:
            log.warning("own spans refused", extra={"violations": violations[:3]})
        if not records:
            return SpanExportResult.SUCCESS
        try:
            asyncio.run_coroutine_threadsafe(
                self._store.insert(records, kept=self._keep_every_trace), self._loop
            ).result(10)
        except Exception:
            log.exception("own spans not stored")
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None
