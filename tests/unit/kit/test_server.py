"""The runtime kit against a real grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.kit.channels import open_channel
from services.kit.context import request_id_var
from services.kit.errors import abort_invalid
from services.kit.limits import MAX_REPORTED_VIOLATIONS
from services.kit.server import Running, start
from services.kit.settings import ServiceSettings

SERVICE = "toolmesh.test.v1.Echo"


class EchoSettings(ServiceSettings):
    service_name = "echo"


SLOW_STARTED: list[float] = []  # when each Slow call reached its handler


async def _slow(request: bytes, context: aio.ServicerContext) -> bytes:
    SLOW_STARTED.append(time.monotonic())
    await asyncio.sleep(float(request.decode()))
    return b"done"


async def _boom(request: bytes, context: aio.ServicerContext) -> bytes:
    raise RuntimeError("secret-value-that-must-not-leak")


async def _invalid(request: bytes, context: aio.ServicerContext) -> bytes:
    await abort_invalid(context, [("prompt", "must not be empty")])
    return b""


async def _many_invalid(request: bytes, context: aio.ServicerContext) -> bytes:
    await abort_invalid(context, [(f"items[{i}]", "bad") for i in range(5000)])
    return b""


async def _request_id(request: bytes, context: aio.ServicerContext) -> bytes:
    return request_id_var.get().encode()


async def _register(server: aio.Server) -> Sequence[str]:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in (
            ("Slow", _slow),
            ("Boom", _boom),
            ("Invalid", _invalid),
            ("ManyInvalid", _many_invalid),
            ("RequestId", _request_id),
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return [SERVICE]


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    server = await start(EchoSettings(port=0), _register)
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


async def test_sigterm_style_stop_drains_in_flight_calls_and_flips_health(
    running: Running, channel: aio.Channel
) -> None:
    slow = channel.unary_unary(f"/{SERVICE}/Slow")
    started = len(SLOW_STARTED)
    in_flight = asyncio.ensure_future(slow(b"1.0", timeout=10))
    deadline = time.monotonic() + 5
    while len(SLOW_STARTED) == started:  # in flight: inside its handler
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(running.stop(grace=5))
    health = health_pb2_grpc.HealthStub(channel)
    # New calls are refused (once health has flipped and the server stops) while the in-flight
    # one is still running.
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
        except aio.AioRpcError as err:
            # Refused (or, arriving just as the listener closes, cancelled): not served.
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            break
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.sleep(0.01)
    assert not in_flight.done()
    assert await in_flight == b"done"
    await stopping


async def test_health_goes_not_serving_before_the_server_stops(
    running: Running, channel: aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await running.health.enter_graceful_shutdown()
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_unhandled_errors_become_internal_without_leaking(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(aio.AioRpcError) as err:
        await channel.unary_unary(f"/{SERVICE}/Boom")(b"", timeout=2)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-value" not in (err.value.details() or "")
    assert "incident" in (err.value.details() or "")
    assert any("secret-value" in (r.exc_text or "") for r in caplog.records)


async def test_invalid_argument_carries_bad_request_details(channel: aio.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Invalid")(b"", timeout=2)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "prompt: must not be empty"
    status = await rpc_status.aio.from_call(call)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "prompt"


async def test_a_taken_port_fails_loudly(running: Running) -> None:
    with pytest.raises(RuntimeError):
        await start(EchoSettings(port=running.port), _register)


def test_settings_read_service_prefix_before_shared_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("TOOLMESH_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("TOOLMESH_ECHO_LOG_LEVEL", "WARNING")
    settings = EchoSettings()
    assert settings.data_dir == tmp_path / "shared"
    assert settings.log_level == "WARNING"


def test_json_logs_carry_service_and_ids(capsys: pytest.CaptureFixture[str]) -> None:
    from services.kit.context import request_id_var
    from services.kit.logs import configure_logging

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    configure_logging("echo", "INFO")
    token = request_id_var.set("req-1")
    try:
        logging.getLogger("t").info("hello", extra={"k": 1})
    finally:
        request_id_var.reset(token)
        # The handler writes to this test's captured stderr: leave no handler behind.
        root.handlers[:], root.level = saved, level
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["message"] == "hello" and record["service"] == "echo"
    assert record["request_id"] == "req-1" and record["k"] == 1
    assert "trace_id" in record


async def test_health_waits_for_readiness() -> None:
    from services.kit.server import Registered

    gate = asyncio.Event()

    async def register(server: aio.Server) -> Registered:
        names = await _register(server)
        return Registered(names, ready=gate.wait)

    server = await start(EchoSettings(port=0), register)
    chan = open_channel(f"127.0.0.1:{server.port}")
    try:
        health = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        for _ in range(50):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await chan.close()
        await server.stop(grace=0)


async def test_a_failed_bind_runs_the_clean_ups(running: Running) -> None:
    cleaned: list[str] = []

    async def cleanup() -> None:
        cleaned.append("done")

    with pytest.raises(RuntimeError):
        await start(EchoSettings(port=running.port), _register, [cleanup])
    assert cleaned == ["done"]


async def test_thousands_of_violations_are_capped(channel: aio.Channel) -> None:
    """One violation per bad item would outgrow gRPC's metadata limit; the rest are counted."""
    call = channel.unary_unary(f"/{SERVICE}/ManyInvalid")(b"", timeout=2)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    violations = bad_request.field_violations
    assert len(violations) == MAX_REPORTED_VIOLATIONS
    assert violations[-1].description == "and 4981 more violations not listed"


@pytest.mark.parametrize(
    ("sent", "seen"),
    [("req-1.a:b", "req-1.a:b"), ("x" * 129, ""), ("a b", ""), ("a;b", "")],
)
async def test_only_well_formed_request_ids_are_taken(
    channel: aio.Channel, sent: str, seen: str
) -> None:
    reply = await channel.unary_unary(f"/{SERVICE}/RequestId")(
        b"", metadata=(("x-request-id", sent),), timeout=2
    )
    assert reply.decode() == seen
