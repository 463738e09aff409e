"""Telemetry over gRPC against the real server and database: OTLP ingest and traces."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

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
from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

from .conftest import TelemetryServer
from .helpers import OPERATOR, caller, record, request_record, sql

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


async def trace_spans(
    server: TelemetryServer, trace_id: str, who: common_pb2.Caller | None = None
) -> list[telemetry_pb2.TraceSpan]:
    request = telemetry_pb2.GetTraceRequest(trace_id=trace_id, caller=who or caller())
    return list((await server.stub.GetTrace(request)).spans)


async def stored_span_count(server: TelemetryServer) -> int:
    (count,) = (await sql(server, "SELECT count(*) FROM telemetry_spans"))[0]
    return int(count)


async def test_repeated_export_is_stored_once(server: TelemetryServer) -> None:
    request = export_request("toolmesh-memory", [rpc_span(RUN, 4), rpc_span(RUN, 6)])
    await server.otlp.Export(request)
    await server.otlp.Export(request)
    assert await stored_span_count(server) == 2


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

    response = await server.stub.GetTrace(
        telemetry_pb2.GetTraceRequest(trace_id=trace_id.hex(), caller=caller())
    )
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
    assert len(await trace_spans(server, trace_id.hex().upper())) == 4
    # Another tenant gets exactly the answer for an unknown trace; the operator sees it all.
    with pytest.raises(aio.AioRpcError) as caught:
        await trace_spans(server, trace_id.hex(), caller("globex"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no span of this trace is stored"
    assert len(await trace_spans(server, trace_id.hex(), OPERATOR)) == 4


async def test_a_trace_is_the_tenants_whose_usage_record_names_it(server: TelemetryServer) -> None:
    """Through a Collector no span carries a believed tenant: the gateway's record does."""
    trace_id = os.urandom(16)
    await server.otlp.Export(
        export_request("toolmesh-router", [rpc_span(RUN, 3, trace_id=trace_id)])
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await trace_spans(server, trace_id.hex())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await record(server, request_record("r1", 3, trace_id=trace_id.hex()))
    assert [s.route for s in await trace_spans(server, trace_id.hex())] == [RUN]
    with pytest.raises(aio.AioRpcError):
        await trace_spans(server, trace_id.hex(), caller("globex"))


async def test_spans_of_another_tenant_in_a_trace_stay_out(server: TelemetryServer) -> None:
    trace_id = os.urandom(16)
    mine = rpc_span(RUN, 3, trace_id=trace_id, toolmesh__tenant="acme")
    theirs = rpc_span(RUN, 4, trace_id=trace_id, toolmesh__tenant="globex")
    untagged = span(2, trace_id=trace_id, name="route")
    await server.otlp.Export(export_request("toolmesh-gateway", [mine, theirs, untagged]))
    assert sorted(s.duration_ms for s in await trace_spans(server, trace_id.hex())) == [2, 3]
    assert len(await trace_spans(server, trace_id.hex(), OPERATOR)) == 3


async def test_get_trace_errors(server: TelemetryServer) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await trace_spans(server, os.urandom(16).hex())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ("", "xyz", "0" * 32, "a" * 31, "g" * 32):
        with pytest.raises(aio.AioRpcError) as caught:
            await trace_spans(server, bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == ["trace_id"]
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.GetTrace(telemetry_pb2.GetTraceRequest(trace_id=os.urandom(16).hex()))
    assert bad_fields(caught.value) == ["caller.tenant"]


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
    assert await stored_span_count(server) == 0


async def test_odd_but_valid_values_are_stored(server: TelemetryServer) -> None:
    odd = span(2, name="nul\x00name", ratio=float("nan"), blob=b"\x01\xff")
    odd.attributes.add(
        key="list",
        value=otlp_common.AnyValue(
            array_value=otlp_common.ArrayValue(values=[otlp_common.AnyValue(double_value=1.5)])
        ),
    )
    await server.otlp.Export(export_request("toolmesh-x\x00", [odd]))
    (stored,) = await trace_spans(server, odd.trace_id.hex(), OPERATOR)
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
                await trace_spans(server, old.trace_id.hex(), OPERATOR)
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                break
            assert time.monotonic() < deadline, "old span was not pruned"
            await asyncio.sleep(0.05)
        assert len(await trace_spans(server, recent.trace_id.hex(), OPERATOR)) == 1
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
                got = await trace_spans(collector, sent.trace_id.hex(), OPERATOR)
                break
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert time.monotonic() < deadline, "span was not forwarded"
                await asyncio.sleep(0.05)
        assert [(s.service, s.route, s.duration_ms) for s in got] == [("toolmesh-gateway", RUN, 7)]
    finally:
        await forwarding.stop()
        await collector.stop()


def test_never_exports_its_own_spans_to_itself() -> None:
    assert TelemetrySettings().otlp_endpoint == ""
    assert TelemetrySettings(otlp_endpoint="127.0.0.1:50055").otlp_endpoint == ""
    assert TelemetrySettings(otlp_endpoint="localhost:50055").otlp_endpoint == ""
    collector = TelemetrySettings(otlp_endpoint="collector:4317")
    assert collector.otlp_endpoint == "collector:4317"


def _span_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("OtelBatch")}


async def test_a_stopped_server_stops_recording_its_own_spans(tmp_path: Path) -> None:
    """Telemetry stores its own spans through the process's tracer provider, which outlives
    the server: stopping it must end that recording (no worker thread, no processor writing
    to a closed store), or every server a process builds would leave one behind."""
    before = _span_threads()
    server = await TelemetryServer(TelemetrySettings(port=0, data_dir=tmp_path)).start()
    try:
        assert len(_span_threads() - before) == 1
    finally:
        await server.stop()
    assert _span_threads() - before == set()


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
    spans = await trace_spans(server, trace_id)
    assert [(s.name, s.route, s.grpc_status_code, s.tenant, s.error) for s in spans[:1]] == [
        ("toolmesh.gateway.v1.Gateway/Run", RUN, 13, "acme", True)
    ]
    assert (spans[1].tool_name, spans[1].duration_ms, spans[1].error) == ("calc", 12, True)
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
        sent = rpc_span(RUN, 2)
        await servers[0].otlp.Export(export_request("toolmesh-x", [sent]))
        assert len(await trace_spans(servers[2], sent.trace_id.hex(), OPERATOR)) == 1
    finally:
        for running in servers:
            await running.stop()
