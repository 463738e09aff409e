"""The face's parts in-process against the same real gateway: the token cache (injected clock),
readiness, DNS-rebinding settings, start-up refusals and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from mcpface.auth import TokenCheck, TokenRejected
from mcpface.server import Readiness, transport_security
from mcpface.settings import McpFaceSettings
from tests.faceproc import FaceProcess
from tests.unit.gateway.conftest import bearer
from tests.unit.mcpface.conftest import Faced
from toolmesh.gateway.v1 import gateway_pb2


async def _revoked_at_the_gateway(faced: Faced, token: str) -> None:
    """Until the gateway (refreshing every 0.1 s) refuses the token."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        try:
            await faced.gw.stub.GetServiceInfo(
                gateway_pb2.GetServiceInfoRequest(), metadata=bearer(token), timeout=2
            )
        except aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


async def test_an_accepted_token_is_trusted_for_the_cache_time_then_checked_again(
    faced: Faced,
) -> None:
    now = [0.0]
    check = TokenCheck(faced.gw.stub, cache_s=30, cache_size=10, timeout_s=5, clock=lambda: now[0])
    token = faced.token(jti="cached-1", scope="tools:read", sub="cache", tenant="small")
    caller = await check.caller(token)
    assert (caller.tenant, caller.subject, caller.scopes) == ("small", "cache", {"tools:read"})
    faced.gw.fakes.auth.revoked.add("cached-1")
    await _revoked_at_the_gateway(faced, token)
    now[0] = 29.0
    assert await check.caller(token) == caller  # remembered: no hop
    now[0] = 30.5
    with pytest.raises(TokenRejected, match="revoked"):
        await check.caller(token)


async def test_a_token_is_never_trusted_past_its_expiry_and_the_cache_is_bounded(
    faced: Faced,
) -> None:
    now = [0.0]
    check = TokenCheck(faced.gw.stub, cache_s=30, cache_size=1, timeout_s=5, clock=lambda: now[0])
    short = faced.token(jti="short-1", exp=int(time.time()) + 5)
    other = faced.token(jti="other-1")
    await check.caller(short)
    faced.gw.fakes.auth.revoked.update({"short-1", "other-1"})
    await _revoked_at_the_gateway(faced, short)
    now[0] = 4.0
    await check.caller(short)  # still remembered
    now[0] = 6.0
    with pytest.raises(TokenRejected):
        await check.caller(short)  # its exp passed: asked again
    # cache_size 1: remembering "other" would evict "short"; checked again, "other" is refused.
    with pytest.raises(TokenRejected):
        await check.caller(other)


async def test_readiness_follows_the_gateway_and_draining() -> None:
    settings = McpFaceSettings(readiness_cache_s=0, list_timeout_s=0.5)
    async with aio.insecure_channel("127.0.0.1:1") as channel:
        readiness = Readiness(health_pb2_grpc.HealthStub(channel), settings)
        ready, reason = await readiness.check()
        assert not ready and reason.startswith("gateway ")
        readiness.draining = True
        assert await readiness.check() == (False, "draining")


async def test_readiness_is_cached(faced: Faced) -> None:
    settings = McpFaceSettings(readiness_cache_s=60)
    port = int(faced.face.gateway_target.rsplit(":", 1)[1])
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        readiness = Readiness(health_pb2_grpc.HealthStub(channel), settings)
        assert await readiness.check() == (True, "gateway serving")
    # The channel is closed: a fresh check would fail, the cached answer does not.
    assert await readiness.check() == (True, "gateway serving")


def test_dns_rebinding_protection_on_loopback_and_with_a_host_list() -> None:
    loopback = transport_security(McpFaceSettings(host="127.0.0.1"))
    assert loopback.enable_dns_rebinding_protection
    assert "127.0.0.1:*" in loopback.allowed_hosts
    listed = transport_security(McpFaceSettings(host="0.0.0.0", allowed_hosts="mcp.example.com"))
    assert listed.allowed_hosts == ["mcp.example.com"]
    assert "https://mcp.example.com" in listed.allowed_origins
    assert not transport_security(McpFaceSettings(host="0.0.0.0")).enable_dns_rebinding_protection


async def test_production_without_tls_refuses_to_start() -> None:
    log = Path(tempfile.mkdtemp(prefix="toolmesh-mcpface-")) / "face.log"
    face = FaceProcess("127.0.0.1:1", log, env={"TOOLMESH_ENV": "production"})
    with pytest.raises(AssertionError, match="exited"):
        await asyncio.to_thread(face.start, 20.0)
    assert face.stop() == 2
    assert "requires mutual TLS" in face.tail()


async def test_sigterm_turns_readiness_off_and_exits_cleanly(faced: Faced) -> None:
    log = Path(tempfile.mkdtemp(prefix="toolmesh-mcpface-")) / "face.log"
    face = FaceProcess(faced.face.gateway_target, log)
    await asyncio.to_thread(face.start)
    assert face.proc is not None
    face.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(face.stop) == 0
    messages = [r.get("message") for r in face.records()]
    assert "draining" in messages and messages[-1] == "stopped"
