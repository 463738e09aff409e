"""Deadline propagation to the tool call, and what the Run span carries."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.unit.gateway.conftest import GatewayUnderTest, bearer, start_gateway
from tests.unit.gateway.fakes import Fakes
from toolmesh.gateway.v1 import gateway_pb2

WIRE_ROUNDING_S = 0.003


async def _run(gw: GatewayUnderTest, timeout: float | None) -> gateway_pb2.RunResponse:
    return await gw.stub.Run(
        gateway_pb2.RunRequest(session_id="s", prompt="what is 1 + 1"),
        metadata=bearer(gw.token()),
        timeout=timeout,
    )


async def test_tool_call_gets_what_is_left_of_the_callers_deadline(gw: GatewayUnderTest) -> None:
    await _run(gw, timeout=0.8)
    budget = gw.fakes.router.invoke_budgets[-1]
    # Below one second gRPC sends timeouts rounded up to whole milliseconds (hence the slack);
    # above it C-core rounds up to coarser units, up to 100 ms at 1-10 s. The lower bound
    # leaves a loaded machine time to get there.
    assert budget is not None and 0.2 < budget <= 0.8 - 0.05 + WIRE_ROUNDING_S


async def test_without_a_caller_deadline_the_default_applies_capped_by_the_maximum() -> None:
    fakes = Fakes()
    inner, gateway, channel, gw = await start_gateway(
        fakes, default_deadline_s=3.0, max_deadline_s=0.9
    )
    try:
        await gw.wait_ready()
        await _run(gw, timeout=None)
        await _run(gw, timeout=20.0)
        for budget in fakes.router.invoke_budgets:
            assert budget is not None and 0.2 < budget <= 0.9 - 0.05 + WIRE_ROUNDING_S
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


async def test_slow_tool_under_a_short_deadline_ends_in_the_contract_fallback() -> None:
    # A 250 ms reserve: the fallback's outbox commit and trip back fit before the caller's
    # deadline even on a loaded machine (the default 50 ms is tuned for production hosts).
    fakes = Fakes()
    inner, gateway, channel, gw = await start_gateway(fakes, deadline_reserve_ms=250)
    try:
        await gw.wait_ready()
        fakes.router.invoke_delay_s = 3.0
        reply = await _run(gw, timeout=0.8)
        assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
        assert list(reply.degraded) == ["tool:calculator"]
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


async def test_a_caller_deadline_shorter_than_the_reserve_is_deadline_exceeded(
    gw: GatewayUnderTest,
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await _run(gw, timeout=0.02)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_run_span_carries_tenant_request_tool_and_outcome(
    spans: InMemorySpanExporter,
) -> None:
    inner, gateway, channel, gw = await start_gateway(Fakes())
    try:
        await gw.wait_ready()
        reply = await _run(gw, timeout=5)
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)
    run_spans = [s for s in spans.get_finished_spans() if s.name.endswith("Gateway/Run")]
    assert run_spans, [s.name for s in spans.get_finished_spans()]
    attributes = dict(run_spans[-1].attributes or {})
    assert attributes["toolmesh.tenant"] == "acme"
    assert attributes["toolmesh.request_id"] == reply.request_id
    assert attributes["gen_ai.tool.name"] == "calculator"
    assert attributes["toolmesh.outcome"] == "OUTCOME_TOOL_ANSWERED"
    assert tuple(attributes["toolmesh.degraded"]) == ()  # type: ignore[arg-type]
    assert reply.trace_id == format(run_spans[-1].context.trace_id, "032x")


async def test_a_callers_trace_context_is_a_link_never_the_parent(
    spans: InMemorySpanExporter,
) -> None:
    """A caller cannot join another trace, nor switch recording off with sampled=0."""
    foreign_trace = "0af7651916cd43dd8448eb211c80319c"
    inner, gateway, channel, gw = await start_gateway(Fakes())
    try:
        await gw.wait_ready()
        for flags in ("01", "00"):
            reply = await gw.stub.Run(
                gateway_pb2.RunRequest(session_id="s", prompt="what is 1 + 1"),
                metadata=(
                    *bearer(gw.token()),
                    ("traceparent", f"00-{foreign_trace}-b7ad6b7169203331-{flags}"),
                ),
                timeout=5,
            )
            assert reply.trace_id != foreign_trace
            run_span = next(
                s
                for s in spans.get_finished_spans()
                if s.name.endswith("Gateway/Run")
                and format(s.context.trace_id, "032x") == reply.trace_id
            )
            assert run_span.parent is None
            assert run_span.context.trace_flags.sampled
            links = [format(link.context.trace_id, "032x") for link in run_span.links]
            assert links == [foreign_trace]
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


def _points(reader: InMemoryMetricReader, name: str) -> list[dict[str, object]]:
    data = reader.get_metrics_data()
    found: list[dict[str, object]] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(
                        {**dict(p.attributes or {}), "value": p.value}  # type: ignore[union-attr]
                        for p in metric.data.data_points
                    )
    return found


async def test_a_fallback_is_on_the_span_and_counted_by_dependency(
    spans: InMemorySpanExporter, metric_reader: InMemoryMetricReader
) -> None:
    fakes = Fakes()
    fakes.router.route_error = grpc.StatusCode.UNAVAILABLE
    inner, gateway, channel, gw = await start_gateway(fakes)
    try:
        await gw.wait_ready()
        reply = await _run(gw, timeout=5)
        inflight = _points(metric_reader, "toolmesh.gateway.inflight")
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)
    assert list(reply.degraded) == ["router"]
    run_span = [s for s in spans.get_finished_spans() if s.name.endswith("Gateway/Run")][-1]
    attributes = dict(run_span.attributes or {})
    assert attributes["toolmesh.outcome"] == "OUTCOME_FALLBACK"
    assert tuple(attributes["toolmesh.degraded"]) == ("router",)  # type: ignore[arg-type]
    fallbacks = _points(metric_reader, "toolmesh.gateway.fallbacks")
    assert any(p["dependency"] == "router" and p["value"] >= 1 for p in fallbacks), fallbacks
    assert {"bulkhead": "runs", "value": 0} in inflight
