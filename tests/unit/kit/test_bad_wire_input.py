"""Every RPC of every service, on a real in-process server built by the service itself, fed bytes
that do not parse and metadata no gRPC client would send: INVALID_ARGUMENT "request could not be
decoded" (never UNKNOWN with the parser's text), no traceback in the logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc import aio

from gateway.app import build as gateway_build
from gateway.settings import GatewaySettings
from services.auth.app import build as auth_build
from services.auth.settings import AuthSettings
from services.kit.interceptors import UNDECODABLE_MESSAGE
from services.kit.logs import configure_logging
from services.kit.server import Cleanup, Register, Running, start
from services.kit.settings import ServiceSettings
from services.memory.app import build as memory_build
from services.memory.settings import MemorySettings
from services.router.app import build as router_build
from services.router.settings import RouterSettings
from services.telemetry.app import build as telemetry_build
from services.telemetry.settings import TelemetrySettings
from tests.wire import raw_call

# Nothing listens here: a dependency that is down, which must not matter for bad bytes.
NOWHERE = "127.0.0.1:9"

Build = Callable[[ServiceSettings, list[Cleanup]], Register]


def _settings(service: str, data_dir: Path) -> tuple[ServiceSettings, Build]:
    common: dict[str, object] = {
        "port": 0,
        "metrics_port": 0,
        "data_dir": data_dir,
        "otlp_endpoint": "",
    }
    if service == "gateway":
        targets = {f"{n}_target": NOWHERE for n in ("auth", "router", "memory", "telemetry")}
        return GatewaySettings(**common, **targets), gateway_build  # type: ignore[arg-type]
    if service == "auth":
        return AuthSettings(**common, telemetry_target=NOWHERE), auth_build  # type: ignore[arg-type]
    if service == "router":
        return RouterSettings(**common, telemetry_target=NOWHERE), router_build  # type: ignore[arg-type]
    if service == "memory":
        return MemorySettings(**common), memory_build  # type: ignore[arg-type]
    return TelemetrySettings(**common), telemetry_build  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["gateway", "auth", "router", "memory", "telemetry"])
async def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    settings, build = _settings(request.param, tmp_path_factory.mktemp(request.param))
    # As in a service process (run_service): the kit's logging, redaction and quieting.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(settings.service_name, "INFO")
    cleanups: list[Cleanup] = []
    running = await start(settings, build(settings, cleanups), cleanups)
    try:
        yield running
    finally:
        await running.stop(grace=0)
        root.handlers[:], root.level = handlers, level


def _methods(running: Running) -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    names = [*running.service_names, "grpc.health.v1.Health"]
    return [m for name in names for m in pool.FindServiceByName(name).methods]


def _not_utf8(method: MethodDescriptor) -> bytes | None:
    """A request whose first string field holds bytes that are not UTF-8."""
    for item in method.input_type.fields:
        if item.type == FieldDescriptor.TYPE_STRING:
            return bytes([(item.number << 3) | 2]) + b"\x02\xff\xfe" if item.number < 16 else None
    return None


async def _send(channel: aio.Channel, method: MethodDescriptor, body: bytes) -> aio.AioRpcError:
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.server_streaming:
        stream = channel.unary_stream(path)(body, timeout=10)
        with pytest.raises(aio.AioRpcError) as err:
            async for _ in stream:
                pass
    else:
        with pytest.raises(aio.AioRpcError) as err:
            await channel.unary_unary(path)(body, timeout=10)
    return err.value


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info or r.exc_text or r.levelno >= logging.ERROR
    ]


async def test_every_rpc_refuses_undecodable_bytes(
    service: Running, caplog: pytest.LogCaptureFixture
) -> None:
    methods = _methods(service)
    assert len(methods) >= 3
    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        for method in methods:
            bodies = [b"\xff\xff\xff\xff\xff", _not_utf8(method)]
            for body in (b for b in bodies if b is not None):
                with caplog.at_level(logging.DEBUG):
                    err = await _send(channel, method, body)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, body)
                assert err.details() == UNDECODABLE_MESSAGE, (method.full_name, err.details())
    assert _tracebacks(caplog) == []


TOKEN = b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


# What a handler answers for a request without fields: any code of the service's own, but never
# UNKNOWN or INTERNAL.
HANDLER_CODES = {"0", "3", "16"}


@pytest.mark.parametrize(
    ("headers", "codes"),
    [
        # Not UTF-8 in authorization: grpc drops the value; the call goes on without it.
        ([(b"authorization", b"Bearer " + TOKEN + b"\xff")], HANDLER_CODES),
        ([(b"x-request-id", b"\xff\xfe")], HANDLER_CODES),
        ([(b"x-large", b"a" * 24_000)], HANDLER_CODES),
        # Over the 32 KiB metadata limit: refused by the transport, or (Huffman-coded below
        # the limit on the wire) passed on.
        ([(b"x-huge", bytes(range(32, 127)) * 1_000)], {*HANDLER_CODES, "8", "reset"}),
        # Not base64 in a -bin header: grpc's transport answers INTERNAL "Error parsing ...
        # metadata" before any Python code runs (grpc core's own answer, logged by nothing).
        ([(b"x-junk-bin", b"\xff\xfe!!")], {"13"}),
    ],
    ids=["auth-not-utf8", "request-id-not-utf8", "large", "over-limit", "junk-bin"],
)
async def test_odd_metadata_never_logs_a_traceback_or_the_value(
    service: Running,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[bytes, bytes]],
    codes: set[str],
) -> None:
    method = next(m for m in _methods(service) if not m.server_streaming)
    path = f"/{method.containing_service.full_name}/{method.name}"
    with caplog.at_level(logging.INFO):
        answer = await asyncio.to_thread(raw_call, service.port, path, b"", tuple(headers))
    status = answer.get("grpc-status", "reset" if "reset" in answer else "none")
    assert status in codes, answer
    if status == "13":
        assert answer["grpc-message"].startswith("Error parsing 'x-junk-bin' metadata")
    assert _tracebacks(caplog) == []
    assert not [r for r in caplog.records if TOKEN.decode() in r.getMessage()]
