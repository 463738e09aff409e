"""Tail sampling of traces: errors and slow traces always kept, the rest by a per-trace ratio
that matches OpenTelemetry's TraceIdRatioBased sampler, decided once per trace."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.sampling import Decision as OtelDecision
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from services.telemetry.sampling import Decision, TraceFacts, decide, ratio_keeps
from services.telemetry.settings import TelemetrySettings

from .conftest import TelemetryServer
from .helpers import sql
from .test_telemetry import export_request, rpc_span, span

RUN = "/toolmesh.gateway.v1.Gateway/Run"


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_the_ratio_rule_is_opentelemetrys(ratio: float) -> None:
    sampler = TraceIdRatioBased(ratio)
    for _ in range(2000):
        trace_id = int.from_bytes(os.urandom(16), "big")
        otel = sampler.should_sample(None, trace_id, "x").decision == OtelDecision.RECORD_AND_SAMPLE
        assert ratio_keeps(f"{trace_id:032x}", ratio) == otel


def test_errors_and_slow_traces_are_always_kept() -> None:
    dropped = "0" * 16 + "f" * 16  # the highest low half: dropped at any ratio below 1
    quiet = TraceFacts(dropped, has_error=False, longest_ms=10, has_kept_spans=False)
    assert decide(quiet, ratio=0.5, slow_ms=500) is Decision.DROP
    assert decide(quiet, ratio=1.0, slow_ms=500) is Decision.RATIO
    failed = TraceFacts(dropped, has_error=True, longest_ms=10, has_kept_spans=False)
    assert decide(failed, ratio=0.0, slow_ms=500) is Decision.ERROR
    slow = TraceFacts(dropped, has_error=False, longest_ms=500, has_kept_spans=False)
    assert decide(slow, ratio=0.0, slow_ms=500) is Decision.SLOW
    late = TraceFacts(dropped, has_error=False, longest_ms=1, has_kept_spans=True)
    assert decide(late, ratio=0.0, slow_ms=500) is Decision.ALREADY_KEPT


def trace_id(low: int) -> bytes:
    """A trace id whose low 64 bits (what the ratio looks at) are ``low``."""
    return os.urandom(8) + low.to_bytes(8, "big")


async def span_counts(server: TelemetryServer) -> dict[tuple[str, bool], int]:
    rows = await sql(
        server, "SELECT trace_id, kept, count(*) FROM telemetry_spans GROUP BY trace_id, kept"
    )
    return {(row[0], bool(row[1])): int(row[2]) for row in rows}


async def wait_decided(server: TelemetryServer) -> dict[tuple[str, bool], int]:
    deadline = time.monotonic() + 10
    while True:
        counts = await span_counts(server)
        if not any(not kept for _, kept in counts):
            return counts
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.05)


async def test_traces_are_kept_or_dropped_whole(settings: TelemetrySettings) -> None:
    sampled = settings.model_copy(
        update={
            "trace_keep_ratio": 0.5,
            "trace_keep_slow_ms": 500,
            "trace_decision_wait_s": 0.3,
            "trace_decision_interval_s": 0.05,
        }
    )
    server = await TelemetryServer(sampled).start()
    try:
        ordinary_kept, ordinary_dropped = trace_id(0), trace_id(2**64 - 1)
        failed, slow = trace_id(2**64 - 1), trace_id(2**64 - 2)
        batch = []
        for tid in (ordinary_kept, ordinary_dropped):
            batch += [rpc_span(RUN, 20, trace_id=tid), span(3, trace_id=tid, name="route")]
        batch += [rpc_span(RUN, 20, trace_id=failed), span(3, trace_id=failed, error=True)]
        batch += [rpc_span(RUN, 650, trace_id=slow), span(3, trace_id=slow)]
        await server.otlp.Export(export_request("toolmesh-gateway", batch))
        counts = await wait_decided(server)
        assert counts == {
            (ordinary_kept.hex(), True): 2,
            (failed.hex(), True): 2,
            (slow.hex(), True): 2,
        }
        # A span arriving after its trace was decided follows the decision.
        await server.otlp.Export(
            export_request(
                "toolmesh-memory",
                [span(1, trace_id=failed, name="late"), span(1, trace_id=ordinary_dropped)],
            )
        )
        counts = await wait_decided(server)
        assert counts[failed.hex(), True] == 3
        assert (ordinary_dropped.hex(), True) not in counts
    finally:
        await server.stop()


async def test_every_trace_is_kept_at_ratio_one(tmp_path: Path) -> None:
    """The default: spans are stored decided, and nothing is ever deleted by sampling."""
    server = await TelemetryServer(TelemetrySettings(port=0, data_dir=tmp_path)).start()
    try:
        tid = trace_id(2**64 - 1)
        await server.otlp.Export(
            export_request("toolmesh-gateway", [rpc_span(RUN, 2, trace_id=tid)])
        )
        assert await span_counts(server) == {(tid.hex(), True): 1}
    finally:
        await server.stop()
