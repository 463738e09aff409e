"""Server-streaming RPCs, standard health (Check, Watch, List, client-side health checking) and
undecodable requests, against a real grpc.aio server started by the kit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.kit.channels import open_channel
from services.kit.interceptors import UNDECODABLE_MESSAGE
from services.kit.server import Running, start
from services.kit.settings import ServiceSettings

SERVICE = "toolmesh.test.v1.Streams"
Text = wrappers_pb2.StringValue


class StreamSettings(ServiceSettings):
    service_name = "streams"


async def _count(request: Text, context: aio.ServicerContext) -> AsyncIterator[Text]:
    """An async-generator handler (the usual style)."""
    for i in range(int(request.value or "3")):
        yield Text(value=str(i))


async def _push(request: Text, context: aio.ServicerContext) -> None:
    """A handler that writes itself, as grpc's own Health/Watch does."""
    for i in range(int(request.value or "3")):
        await context.write(Text(value=f"p{i}"))


async def _stream_boom(request: Text, context: aio.ServicerContext) -> AsyncIterator[Text]:
    yield Text(value="first")
    raise RuntimeError("secret-internal-detail")


async def _echo(request: Text, context: aio.ServicerContext) -> Text:
    return request


def _stream(fn: object) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
    )


async def _register(server: aio.Server) -> Sequence[str]:
    handlers = {
        "Count": _stream(_count),
        "Push": _stream(_push),
        "StreamBoom": _stream(_stream_boom),
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return [SERVICE]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def running(spans: InMemorySpanExporter) -> AsyncIterator[Running]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = await start(StreamSettings(port=0), _register, tracer_provider=provider)
    try:
        yield server
    finally:
        await server.stop(grace=0)


@pytest.fixture
async def channel(running: Running) -> AsyncIterator[aio.Channel]:
    chan = open_channel(f"127.0.0.1:{running.port}")
    try:
        yield chan
    finally:
        await chan.close()


def _call(channel: aio.Channel, method: str) -> aio.UnaryStreamMultiCallable:
    return channel.unary_stream(
        f"/{SERVICE}/{method}",
        request_serializer=Text.SerializeToString,
        response_deserializer=Text.FromString,
    )


@pytest.mark.parametrize(("method", "prefix"), [("Count", ""), ("Push", "p")])
async def test_both_streaming_styles_work_through_every_interceptor(
    running: Running, spans: InMemorySpanExporter, method: str, prefix: str
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # A bare channel: the kit's own would put its client span's traceparent in the call.
    async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        replies = [
            r.value
            async for r in _call(channel, method)(
                Text(value="4"), timeout=5, metadata=(("traceparent", traceparent),)
            )
        ]
    assert replies == [f"{prefix}{i}" for i in range(4)]
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"/{SERVICE}/{method}"]
    assert span.kind is SpanKind.SERVER
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 0
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"


async def test_an_error_mid_stream_is_internal_without_leaking(
    channel: aio.Channel, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    call = _call(channel, "StreamBoom")(Text(), timeout=5)
    received = []
    with caplog.at_level(logging.ERROR), pytest.raises(aio.AioRpcError) as err:
        async for reply in call:
            received.append(reply.value)
    assert received == ["first"]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in (err.value.details() or "")
    (span,) = [s for s in spans.get_finished_spans() if s.name.endswith("/StreamBoom")]
    assert not span.status.is_ok


async def test_unary_calls_are_still_traced(
    channel: aio.Channel, spans: InMemorySpanExporter
) -> None:
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    assert await echo(Text(value="x").SerializeToString(), timeout=5)
    assert [s.name for s in spans.get_finished_spans()] == [f"/{SERVICE}/Echo"]


async def test_health_is_not_traced(channel: aio.Channel, spans: InMemorySpanExporter) -> None:
    """Probes call Check every few seconds: a span each would only be noise."""
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert spans.get_finished_spans() == ()


async def test_watch_streams_every_status_change(running: Running, channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    statuses = watch.__aiter__()
    first = await asyncio.wait_for(statuses.__anext__(), 5)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    await running.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    second = await asyncio.wait_for(statuses.__anext__(), 5)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    third = await asyncio.wait_for(statuses.__anext__(), 5)
    assert third.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


async def test_watch_of_an_unknown_service_says_so(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    first = await asyncio.wait_for(watch.__aiter__().__anext__(), 5)
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    watch.cancel()


async def test_list_answers_every_service(channel: aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).List(
        health_pb2.HealthListRequest(), timeout=5
    )
    assert reply.statuses[SERVICE].status == health_pb2.HealthCheckResponse.SERVING
    assert reply.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_with_health_checking_follows_the_servers_status(
    running: Running,
) -> None:
    """gRPC client-side health checking (healthCheckConfig) watches Health/Watch: it sends only
    to a SERVING server, and fails fast (UNAVAILABLE) while the server is NOT_SERVING."""
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    chan = aio.insecure_channel(
        f"127.0.0.1:{running.port}", options=[("grpc.service_config", json.dumps(config))]
    )
    echo = chan.unary_unary(f"/{SERVICE}/Echo")
    payload = Text(value="hi").SerializeToString()
    try:
        assert await echo(payload, timeout=5, wait_for_ready=True) == payload
        await running.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        for _ in range(50):
            try:
                await echo(payload, timeout=1)
            except aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the client kept sending to a NOT_SERVING server")
        await running.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert await echo(payload, timeout=5, wait_for_ready=True) == payload
    finally:
        await chan.close()


# Bytes that are no message at all, and a message whose string field is not UTF-8.
CORRUPT = b"\xff\xff\xff\xff"
NOT_UTF8 = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("body", [CORRUPT, NOT_UTF8], ids=["corrupt", "not-utf8"])
@pytest.mark.parametrize("method", ["Echo", "Count", "Push"])
async def test_undecodable_requests_are_invalid_argument_without_a_traceback(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture, method: str, body: bytes
) -> None:
    if method == "Echo":
        call: aio.Call = channel.unary_unary(f"/{SERVICE}/{method}")(body, timeout=5)
    else:
        call = channel.unary_stream(f"/{SERVICE}/{method}")(body, timeout=5)
    with caplog.at_level(logging.DEBUG), pytest.raises(aio.AioRpcError) as err:
        if method == "Echo":
            await call  # type: ignore[misc]
        else:
            async for _ in call:  # type: ignore[attr-defined]
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == UNDECODABLE_MESSAGE
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["request"]
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_flood_of_undecodable_requests_logs_a_bounded_number_of_lines(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    with caplog.at_level(logging.INFO, logger="toolmesh.rpc"):
        for _ in range(200):
            with pytest.raises(aio.AioRpcError):
                await echo(CORRUPT, timeout=5)
    lines = [r for r in caplog.records if r.name == "toolmesh.rpc"]
    # Two sites (the decode refusal and the access log), each at most its burst of 20 plus
    # the refill at 1/s while the loop runs.
    assert len(lines) < 60
