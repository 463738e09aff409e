"""Telemetry over gRPC against the real server and database: OTLP ingest, stats, traces."""

from __future__ import annotations

import asyncio
import json
import os
import time

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2 as otlp_common
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kit.db import create_engine
from services.telemetry.migrations import VERSION_TABLE
from services.telemetry.settings import TelemetrySettings
from services.telemetry.store import Base
from toolmesh.telemetry.v1 import telemetry_pb2

from .conftest import TelemetryServer

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
RUN = "/toolmesh.gateway.v1.Gateway/Run"
INFO = "/toolmesh.gateway.v1.Gateway/GetServiceInfo"


def attr(key: str, value: object) -> otlp_common.KeyValue:
    if isinstance(value, bool):
        any_value = otlp_common.AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = otlp_common.AnyValue(int_value=value)
    elif isinstance(value, float):
        any_value = otlp_common.AnyValue(double_value=value)
    elif isinstance(value, bytes):
        any_value = otlp_common.AnyValue(bytes_value=value)
    else:
        any_value = otlp_common.AnyValue(string_value=str(value))
    return otlp_common.KeyValue(key=key, value=any_value)


def span(
    duration_ms: float,
    *,
    kind: int = SERVER,
    name: str = "span",
    error: bool = False,
    ended_s_ago: float = 1.0,
    trace_id: bytes | None = None,
    span_id: bytes | None = None,
    parent: bytes = b"",
    **attributes: object,
) -> trace_pb2.Span:
    end = time.time_ns() - int(ended_s_ago * 1e9)
    return trace_pb2.Span(
        trace_id=trace_id or os.urandom(16),
        span_id=span_id or os.urandom(8),
        parent_span_id=parent,
        name=name,
        kind=kind,
        start_time_unix_nano=end - int(duration_ms * 1_000_000),
        end_time_unix_nano=end,
        status=trace_pb2.Status(
            code=trace_pb2.Status.STATUS_CODE_ERROR if error else trace_pb2.Status.STATUS_CODE_OK
        ),
        attributes=[attr(k.replace("__", "."), v) for k, v in attributes.items()],
    )


def rpc_span(route: str, duration_ms: float, **kw: object) -> trace_pb2.Span:
    service, method = route.strip("/").split("/")
    return span(duration_ms, name=route.strip("/"), rpc__service=service, rpc__method=method, **kw)


def tool_span(tool: str, version: str, duration_ms: float, **kw: object) -> trace_pb2.Span:
    return span(
        duration_ms,
        kind=INTERNAL,
        name=f"execute_tool {tool}",
        gen_ai__operation__name="execute_tool",
        gen_ai__tool__name=tool,
        toolmesh__tool__version=version,
        **kw,
    )


def export_request(
    service: str, spans: list[trace_pb2.Span]
) -> trace_service_pb2.ExportTraceServiceRequest:
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=[attr("service.name", service)]),
                scope_spans=[trace_pb2.ScopeSpans(spans=spans)],
            )
        ]
    )


def bad_fields(error: aio.AioRpcError) -> list[str]:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    fields = []
    for detail in status_pb2.Status.FromString(raw).details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields.extend(v.field for v in bad.field_violations)
    return fields


async def stats(server: TelemetryServer, group_by: int, window_seconds: int = 0, service: str = ""):
    response = await server.stub.GetStats(
        telemetry_pb2.GetStatsRequest(
            group_by=group_by, window_seconds=window_seconds, service=service
        )
    )
    return list(response.rows)


async def export_mesh_traffic(server: TelemetryServer) -> None:
    """Known durations: gateway Run 1..20 ms (2 errors), Info 5 ms, tools calc and search."""
    gateway = [rpc_span(RUN, d, error=d in (7, 20)) for d in range(1, 21)]
    gateway.append(rpc_span(INFO, 5))
    # Client spans and a span older than an hour never count in the default window.
    gateway.append(rpc_span(RUN, 500, kind=CLIENT))
    gateway.append(rpc_span(RUN, 1000, ended_s_ago=7200))
    router = [span(3, name="route"), span(9, name="route", error=True)]
    router += [tool_span("calc", "1.0.0", d, error=d == 4) for d in (8, 2, 6, 4)]
    router.append(tool_span("search", "2.1.0", 100, error=True))
    for request in (
        export_request("toolmesh-gateway", gateway),
        export_request("toolmesh-router", router),
    ):
        await server.otlp.Export(request)


async def test_stats_per_service(server: TelemetryServer) -> None:
    await export_mesh_traffic(server)
    rows = await stats(server, telemetry_pb2.STATS_GROUP_BY_SERVICE)
    assert [r.service for r in rows] == ["toolmesh-gateway", "toolmesh-router"]
    gateway, router = rows
    # Durations 1,2,3,4,5,5,6,...,20: nearest rank 11 of 21 -> 10, rank 20 -> 19, rank 21 -> 20.
    assert (gateway.count, gateway.errors) == (21, 2)
    assert gateway.error_rate == pytest.approx(2 / 21)
    assert (gateway.p50_ms, gateway.p95_ms, gateway.p99_ms) == (10, 19, 20)
    assert gateway.mean_ms == pytest.approx(215 / 21)
    assert (router.count, router.errors, router.error_rate) == (2, 1, 0.5)
    assert (router.p50_ms, router.p95_ms, router.p99_ms, router.mean_ms) == (3, 9, 9, 6)


async def test_stats_per_route(server: TelemetryServer) -> None:
    await export_mesh_traffic(server)
    rows = await stats(server, telemetry_pb2.STATS_GROUP_BY_ROUTE)
    by_route = {(r.service, r.route): r for r in rows}
    assert set(by_route) == {
        ("toolmesh-gateway", RUN),
        ("toolmesh-gateway", INFO),
        # No rpc.* attributes: a SERVER span's route is its name.
        ("toolmesh-router", "route"),
    }
    run = by_route["toolmesh-gateway", RUN]
    assert (run.count, run.errors, run.error_rate) == (20, 2, 0.1)
    assert (run.p50_ms, run.p95_ms, run.p99_ms, run.mean_ms) == (10, 19, 20, 10.5)
    info = by_route["toolmesh-gateway", INFO]
    assert (info.count, info.errors, info.p50_ms, info.p99_ms) == (1, 0, 5, 5)
    only_router = await stats(server, telemetry_pb2.STATS_GROUP_BY_ROUTE, service="toolmesh-router")
    assert [(r.service, r.route, r.count) for r in only_router] == [("toolmesh-router", "route", 2)]


async def test_stats_per_tool(server: TelemetryServer) -> None:
    await export_mesh_traffic(server)
    rows = await stats(server, telemetry_pb2.STATS_GROUP_BY_TOOL)
    assert [(r.tool_name, r.tool_version) for r in rows] == [("calc", "1.0.0"), ("search", "2.1.0")]
    calc, search = rows
    assert (calc.count, calc.errors, calc.error_rate) == (4, 1, 0.25)
    assert (calc.p50_ms, calc.p95_ms, calc.p99_ms, calc.mean_ms) == (4, 8, 8, 5)
    assert (search.count, search.errors, search.error_rate, search.p99_ms) == (1, 1, 1.0, 100)


async def test_window_filters_by_end_time(server: TelemetryServer) -> None:
    await export_mesh_traffic(server)
    three_hours = await stats(server, telemetry_pb2.STATS_GROUP_BY_ROUTE, window_seconds=10_800)
    run = next(r for r in three_hours if r.route == RUN)
    assert (run.count, run.p99_ms) == (21, 1000)
    assert await stats(server, telemetry_pb2.STATS_GROUP_BY_SERVICE, window_seconds=0) != []
    # Only spans that ended within the last half second: none.
    await asyncio.sleep(1.1)
    assert await stats(server, telemetry_pb2.STATS_GROUP_BY_SERVICE, window_seconds=1) == []


async def test_repeated_export_is_not_counted_twice(server: TelemetryServer) -> None:
    request = export_request("toolmesh-memory", [rpc_span(RUN, 4), rpc_span(RUN, 6)])
    await server.otlp.Export(request)
    await server.otlp.Export(request)
    (row,) = await stats(server, telemetry_pb2.STATS_GROUP_BY_SERVICE)
    assert row.count == 2


async def test_get_trace_rebuilds_the_tree(server: TelemetryServer) -> None:
    trace_id = os.urandom(16)
    root, hop, inner, tool = (os.urandom(8) for _ in range(4))
    gateway = [
        rpc_span(
            RUN,
            30,
            ended_s_ago=1.0,
            trace_id=trace_id,
            span_id=root,
            rpc__grpc__status_code=0,
            toolmesh__tenant="acme",
            http__flavor="2",
        ),
        rpc_span(
            "/toolmesh.router.v1.Router/InvokeTool",
            20,
            kind=CLIENT,
            ended_s_ago=1.005,
            trace_id=trace_id,
            span_id=hop,
            parent=root,
        ),
    ]
    router = [
        rpc_span(
            "/toolmesh.router.v1.Router/InvokeTool",
            18,
            ended_s_ago=1.006,
            trace_id=trace_id,
            span_id=inner,
            parent=hop,
        ),
        tool_span(
            "calc",
            "1.0.0",
            10,
            ended_s_ago=1.007,
            error=True,
            trace_id=trace_id,
            span_id=tool,
            parent=inner,
        ),
    ]
    await server.otlp.Export(export_request("toolmesh-router", router))
    await server.otlp.Export(export_request("toolmesh-gateway", gateway))
    await server.otlp.Export(export_request("toolmesh-router", [rpc_span(RUN, 1)]))

    response = await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=trace_id.hex()))
    assert response.trace_id == trace_id.hex()
    spans = list(response.spans)
    # Ordered by start time: root, client hop, server hop, tool.
    assert [s.span_id for s in spans] == [x.hex() for x in (root, hop, inner, tool)]
    assert [s.parent_span_id for s in spans] == ["", root.hex(), hop.hex(), inner.hex()]
    assert [s.service for s in spans] == ["toolmesh-gateway"] * 2 + ["toolmesh-router"] * 2
    assert [s.kind for s in spans] == [
        telemetry_pb2.SPAN_KIND_SERVER,
        telemetry_pb2.SPAN_KIND_CLIENT,
        telemetry_pb2.SPAN_KIND_SERVER,
        telemetry_pb2.SPAN_KIND_INTERNAL,
    ]
    assert [s.duration_ms for s in spans] == [30, 20, 18, 10]
    assert [s.error for s in spans] == [False, False, False, True]
    first = spans[0]
    assert (first.route, first.tenant, first.grpc_status_code) == (RUN, "acme", 0)
    assert json.loads(first.attributes_json) == {"http.flavor": "2"}
    assert not spans[1].HasField("grpc_status_code")
    assert (spans[3].tool_name, spans[3].tool_version) == ("calc", "1.0.0")
    assert json.loads(spans[3].attributes_json) == {"gen_ai.operation.name": "execute_tool"}
    # Upper case ids are the same trace.
    upper = await server.stub.GetTrace(
        telemetry_pb2.GetTraceRequest(trace_id=trace_id.hex().upper())
    )
    assert len(upper.spans) == 4


async def test_get_trace_errors(server: TelemetryServer) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=os.urandom(16).hex()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ("", "xyz", "0" * 32, "a" * 31, "g" * 32):
        with pytest.raises(aio.AioRpcError) as caught:
            await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == ["trace_id"]


@pytest.mark.parametrize(
    ("group_by", "window_seconds", "field"),
    [
        (telemetry_pb2.STATS_GROUP_BY_UNSPECIFIED, 0, "group_by"),
        (99, 0, "group_by"),
        (telemetry_pb2.STATS_GROUP_BY_SERVICE, -1, "window_seconds"),
        (telemetry_pb2.STATS_GROUP_BY_SERVICE, 30 * 86400 + 1, "window_seconds"),
    ],
)
async def test_stats_validation(server, group_by: int, window_seconds: int, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stats(server, group_by, window_seconds)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [field]


async def test_thirty_days_is_the_longest_window(server: TelemetryServer) -> None:
    assert await stats(server, telemetry_pb2.STATS_GROUP_BY_TOOL, 30 * 86400) == []


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: setattr(s, "trace_id", b"\x01" * 8), "trace_id"),
        (lambda s: setattr(s, "trace_id", b"\x00" * 16), "trace_id"),
        (lambda s: setattr(s, "span_id", b""), "span_id"),
        (lambda s: setattr(s, "parent_span_id", b"\x01\x02"), "parent_span_id"),
        (
            lambda s: setattr(s, "end_time_unix_nano", s.start_time_unix_nano - 1),
            "end_time_unix_nano",
        ),
        (lambda s: setattr(s, "start_time_unix_nano", 0), "end_time_unix_nano"),
        (lambda s: setattr(s, "end_time_unix_nano", 2**63), "end_time_unix_nano"),
    ],
)
async def test_malformed_spans_reject_the_batch(server, mutate, field: str) -> None:
    good, bad = rpc_span(RUN, 4), rpc_span(RUN, 5)
    mutate(bad)
    with pytest.raises(aio.AioRpcError) as caught:
        await server.otlp.Export(export_request("toolmesh-gateway", [good, bad]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [f"resource_spans[0].scope_spans[0].spans[1].{field}"]
    assert await stats(server, telemetry_pb2.STATS_GROUP_BY_SERVICE) == []


async def test_odd_but_valid_values_are_stored(server: TelemetryServer) -> None:
    odd = span(2, name="nul\x00name", ratio=float("nan"), blob=b"\x01\xff")
    odd.attributes.add(
        key="list",
        value=otlp_common.AnyValue(
            array_value=otlp_common.ArrayValue(values=[otlp_common.AnyValue(double_value=1.5)])
        ),
    )
    await server.otlp.Export(export_request("toolmesh-x\x00", [odd]))
    (stored,) = (
        await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=odd.trace_id.hex()))
    ).spans
    assert (stored.service, stored.name, stored.route) == ("toolmesh-x", "nulname", "nulname")
    assert json.loads(stored.attributes_json) == {"blob": "01ff", "list": [1.5], "ratio": "nan"}


async def test_undecodable_export_is_invalid_argument(server: TelemetryServer) -> None:
    export = server.channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await export(b"\xff\xff\xff\xff not a protobuf")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["request"]


async def test_retention_prunes_old_spans(tmp_path) -> None:
    settings = TelemetrySettings(
        port=0, data_dir=tmp_path, retention_hours=1, prune_interval_s=0.05
    )
    server = await TelemetryServer(settings).start()
    try:
        old = rpc_span(RUN, 3, ended_s_ago=3700)
        recent = rpc_span(RUN, 3, ended_s_ago=3500)
        await server.otlp.Export(export_request("toolmesh-gateway", [old, recent]))
        deadline = time.monotonic() + 5
        while True:
            try:
                await server.stub.GetTrace(
                    telemetry_pb2.GetTraceRequest(trace_id=old.trace_id.hex())
                )
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                break
            assert time.monotonic() < deadline, "old span was not pruned"
            await asyncio.sleep(0.05)
        kept = await server.stub.GetTrace(
            telemetry_pb2.GetTraceRequest(trace_id=recent.trace_id.hex())
        )
        assert len(kept.spans) == 1
    finally:
        await server.stop()


async def test_forwards_spans_to_another_otlp_endpoint(tmp_path) -> None:
    collector = await TelemetryServer(TelemetrySettings(port=0, data_dir=tmp_path / "c")).start()
    forwarding = await TelemetryServer(
        TelemetrySettings(port=0, data_dir=tmp_path / "f", forward_otlp_endpoint=collector.address)
    ).start()
    try:
        sent = rpc_span(RUN, 7)
        await forwarding.otlp.Export(export_request("toolmesh-gateway", [sent]))
        deadline = time.monotonic() + 5
        while True:
            try:
                got = await collector.stub.GetTrace(
                    telemetry_pb2.GetTraceRequest(trace_id=sent.trace_id.hex())
                )
                break
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert time.monotonic() < deadline, "span was not forwarded"
                await asyncio.sleep(0.05)
        assert [(s.service, s.route, s.duration_ms) for s in got.spans] == [
            ("toolmesh-gateway", RUN, 7)
        ]
    finally:
        await forwarding.stop()
        await collector.stop()


def test_never_exports_its_own_spans_to_itself() -> None:
    assert TelemetrySettings().otlp_endpoint == ""
    assert TelemetrySettings(otlp_endpoint="127.0.0.1:50055").otlp_endpoint == ""
    assert TelemetrySettings(otlp_endpoint="localhost:50055").otlp_endpoint == ""
    collector = TelemetrySettings(otlp_endpoint="collector:4317")
    assert collector.otlp_endpoint == "collector:4317"


async def test_service_info(server: TelemetryServer) -> None:
    info = (await server.stub.GetServiceInfo(telemetry_pb2.GetServiceInfoRequest())).info
    assert info.service == "telemetry"
    assert list(info.contract_versions) == [
        "toolmesh.telemetry.v1",
        "opentelemetry.proto.collector.trace.v1",
    ]


async def test_spans_from_the_opentelemetry_sdk(server: TelemetryServer) -> None:
    def emit() -> str:
        """The SDK exporter is synchronous: run it off the loop the server answers on."""
        provider = TracerProvider(resource=Resource.create({"service.name": "toolmesh-sdk"}))
        exporter = OTLPSpanExporter(endpoint=server.address, insecure=True, timeout=5)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("tests")
        start = time.time_ns() - 1_000_000_000
        run = tracer.start_span(
            "toolmesh.gateway.v1.Gateway/Run",
            kind=SpanKind.SERVER,
            start_time=start,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "toolmesh.gateway.v1.Gateway",
                "rpc.method": "Run",
                "rpc.grpc.status_code": 13,
                "toolmesh.tenant": "acme",
            },
        )
        run.set_status(Status(StatusCode.ERROR, "tool failed"))
        tool = tracer.start_span(
            "execute_tool calc",
            context=trace.set_span_in_context(run),
            kind=SpanKind.INTERNAL,
            start_time=start + 2_000_000,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "calc",
                "toolmesh.tool.version": "1.0.0",
            },
        )
        tool.set_status(Status(StatusCode.ERROR, "boom"))
        tool.end(end_time=start + 14_000_000)
        run.end(end_time=start + 40_000_000)
        provider.shutdown()
        return format(run.get_span_context().trace_id, "032x")

    trace_id = await asyncio.to_thread(emit)
    (row,) = await stats(server, telemetry_pb2.STATS_GROUP_BY_ROUTE, service="toolmesh-sdk")
    assert (row.route, row.count, row.errors, row.p50_ms, row.p99_ms) == (RUN, 1, 1, 40, 40)
    (tool_row,) = await stats(server, telemetry_pb2.STATS_GROUP_BY_TOOL)
    assert (tool_row.tool_name, tool_row.count, tool_row.errors, tool_row.p95_ms) == (
        "calc",
        1,
        1,
        12,
    )
    spans = (await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=trace_id))).spans
    assert [(s.name, s.grpc_status_code, s.tenant) for s in spans[:1]] == [
        ("toolmesh.gateway.v1.Gateway/Run", 13, "acme")
    ]
    assert spans[1].parent_span_id == spans[0].span_id
    assert json.loads(spans[0].attributes_json) == {"rpc.system": "grpc"}


async def test_migrations_match_the_models(server: TelemetryServer) -> None:
    engine = create_engine(server.settings.resolved_database_url())
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"version_table": VERSION_TABLE}),
                    Base.metadata,
                )
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_replicas_starting_together_migrate_once(settings: TelemetrySettings) -> None:
    servers = []
    if not settings.database_url:
        # A fresh SQLite file must become WAL first: the kit's connect hook fails at once (no
        # busy wait) when it switches the mode while another connection holds a lock.
        servers.append(await TelemetryServer(settings).start())
    servers += await asyncio.gather(
        *(TelemetryServer(settings).start() for _ in range(3 - len(servers)))
    )
    try:
        await servers[0].otlp.Export(export_request("toolmesh-x", [rpc_span(RUN, 2)]))
        (row,) = await stats(servers[2], telemetry_pb2.STATS_GROUP_BY_SERVICE)
        assert row.count == 1
    finally:
        for running in servers:
            await running.stop()
