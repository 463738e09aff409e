"""The gateway over real gRPC, in front of contract fakes of auth, router, memory and telemetry."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from tests.unit.gateway.conftest import (
    GatewayUnderTest,
    ManualClock,
    bearer,
    eventually,
    ready_once_auth_is_back,
    start_gateway,
)
from tests.unit.gateway.fakes import Fakes, SigningKey, mint
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2


async def _run(
    gw: GatewayUnderTest, prompt: str, token: str | None = None, **fields: str
) -> gateway_pb2.RunResponse:
    request = gateway_pb2.RunRequest(
        session_id=fields.pop("session_id", "s-1"), prompt=prompt, **fields
    )
    return await gw.stub.Run(request, metadata=bearer(token or gw.token()), timeout=5)


async def _error(call: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_tool_answer_carries_tool_confidence_usage_and_ids(gw: GatewayUnderTest) -> None:
    reply = await _run(gw, "what is 17 * 23")
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert reply.answer == "calculator says 391"
    assert (reply.tool_name, reply.tool_version) == ("calculator", "1.0.0")
    assert reply.confidence == pytest.approx(0.93)
    assert reply.confidence_parts.intent == pytest.approx(0.9)
    assert reply.result_json == '{"value": 391}'
    # The rules routed it: no model read or wrote a token.
    assert (reply.usage.tokens_in, reply.usage.tokens_out, reply.usage.model) == (0, 0, "")
    assert reply.route_method == router_pb2.ROUTE_METHOD_UNSPECIFIED  # the fake says nothing
    assert (reply.usage.tool_calls, reply.usage.cost_units) == (1, 2)
    assert list(reply.degraded) == []
    assert re.fullmatch(r"[0-9a-f]{32}", reply.request_id)
    route = gw.fakes.router.routes[-1]
    assert list(route.allowed_tools) == ["*"] and route.caller.tenant == "acme"
    invocation = gw.fakes.router.invocations[-1]
    assert invocation.idempotency_key == ""  # read-only tool
    assert list(invocation.allowed_tools) == ["*"]
    stored = gw.fakes.memory.turns[("acme", "s-1")]
    assert [t.content for t in stored] == ["what is 17 * 23", "calculator says 391"]
    assert stored[1].tool_name == "calculator" and stored[0].request_id == reply.request_id


async def test_write_tool_gets_the_request_id_as_idempotency_key(gw: GatewayUnderTest) -> None:
    reply = await _run(gw, "note: buy milk")
    assert reply.tool_name == "save_note"
    assert gw.fakes.router.invocations[-1].idempotency_key == reply.request_id


async def test_same_idempotency_key_same_request_id_and_one_write(gw: GatewayUnderTest) -> None:
    first = await _run(gw, "note: buy milk", idempotency_key="retry-1")
    second = await _run(gw, "note: buy milk", idempotency_key="retry-1")
    assert first.request_id == second.request_id
    assert {i.idempotency_key for i in gw.fakes.router.invocations} == {first.request_id}
    assert len(gw.fakes.memory.turns[("acme", "s-1")]) == 2


async def test_no_match_runs_no_tool_and_says_why(gw: GatewayUnderTest) -> None:
    reply = await _run(gw, "sing me a song")
    assert reply.outcome == gateway_pb2.OUTCOME_NO_MATCH
    assert "no tool is confident enough" in reply.answer.lower()
    assert "no intent matched" in reply.answer
    assert reply.tool_name == "" and reply.usage.tool_calls == 0
    assert gw.fakes.router.invocations == []


async def test_memory_down_still_answers_and_says_degraded(gw: GatewayUnderTest) -> None:
    gw.fakes.memory.fail_reads = True
    gw.fakes.memory.fail_writes = True
    reply = await _run(gw, "what is 2 + 2")
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert list(reply.degraded) == ["memory"]


async def test_router_down_gives_the_fallback(gw: GatewayUnderTest) -> None:
    gw.fakes.router.route_error = grpc.StatusCode.UNAVAILABLE
    reply = await _run(gw, "what is 2 + 2")
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert list(reply.degraded) == ["router"]
    assert reply.answer and reply.tool_name == ""


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
async def test_tool_failure_gives_the_contract_fallback(
    gw: GatewayUnderTest, code: grpc.StatusCode
) -> None:
    gw.fakes.router.invoke_error = (code, "tool broke")
    reply = await _run(gw, "what is 2 + 2")
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert reply.answer == "The calculator is unavailable."
    assert list(reply.degraded) == ["tool:calculator"]
    assert reply.usage.tool_calls == 1 and reply.usage.cost_units == 0


async def test_tool_refusing_its_arguments_is_explained(gw: GatewayUnderTest) -> None:
    gw.fakes.router.invoke_error = (grpc.StatusCode.INVALID_ARGUMENT, "division by zero")
    reply = await _run(gw, "what is 1 / 0")
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert "refused" in reply.answer and "division by zero" in reply.answer
    assert list(reply.degraded) == []


async def test_write_tool_needs_tools_write(gw: GatewayUnderTest) -> None:
    err = await _error(_run(gw, "note: buy milk", gw.token(scope="tools:read")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tools:write" in (err.details() or "")
    assert gw.fakes.router.invocations == []


async def test_tool_off_the_tenants_allowlist_is_denied(gw: GatewayUnderTest) -> None:
    # The fake router ignores allowlists; the gateway re-checks what it picked.
    err = await _error(_run(gw, "note: buy milk", gw.token(tenant="small")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(gw.fakes.router.routes[-1].allowed_tools) == ["calculator"]
    assert gw.fakes.router.invocations == []


async def test_tenant_missing_from_the_policy_may_use_nothing(gw: GatewayUnderTest) -> None:
    err = await _error(_run(gw, "what is 2 + 2", gw.token(tenant="stranger")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert gw.fakes.router.routes == []


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"session_id": "ok", "prompt": ""}, "prompt"),
        ({"session_id": "ok", "prompt": "bell \x07"}, "prompt"),
        ({"session_id": "no spaces", "prompt": "hi"}, "session_id"),
        ({"session_id": "ok", "prompt": "hi", "idempotency_key": "k" * 129}, "idempotency_key"),
    ],
)
async def test_bad_input_names_the_field_and_reaches_nobody(
    gw: GatewayUnderTest, fields: dict[str, str], bad_field: str
) -> None:
    call = gw.stub.Run(gateway_pb2.RunRequest(**fields), timeout=5)  # no token: validation first
    err = await _error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(call)
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        violations.extend(v.field for v in bad_request.field_violations)
    assert violations == [bad_field]
    assert gw.fakes.router.routes == [] and gw.fakes.memory.turns == {}


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-jwt"),), (("authorization", "Basic abc"),)],
    ids=["missing", "garbage", "wrong-scheme"],
)
async def test_missing_or_bad_token_is_unauthenticated(
    gw: GatewayUnderTest, metadata: tuple[tuple[str, str], ...]
) -> None:
    call = gw.stub.Run(gateway_pb2.RunRequest(session_id="s", prompt="hi"), metadata=metadata)
    err = await _error(call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not-a-jwt" not in (err.details() or "")


async def test_revocation_and_disabled_client_apply_after_a_refresh(gw: GatewayUnderTest) -> None:
    token = gw.token(jti="revoke-me")
    await _run(gw, "what is 1 + 1", token)
    auth = gw.fakes.auth
    auth.revoked.add("revoke-me")
    auth.disabled.add("bad-client")
    # Refreshes run one after another: once the third since the change has begun, the second,
    # which began after the change, has been applied.
    calls = auth.jwks_calls
    await eventually(lambda: auth.jwks_calls >= calls + 3)
    err = await _error(_run(gw, "what is 1 + 1", token))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "token revoked")
    err = await _error(_run(gw, "what is 1 + 1", gw.token(sub="bad-client")))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "client disabled")


async def test_rotated_key_is_fetched_at_once_on_an_unknown_kid() -> None:
    fakes = Fakes()
    clock = ManualClock()
    inner, gateway, channel, gw = await start_gateway(
        fakes, clock=clock, auth_refresh_s=300, auth_staleness_s=600
    )
    try:
        await gw.wait_ready()
        fakes.auth.keys.append(SigningKey("k2"))
        reply = await _run(gw, "what is 1 + 1", mint(fakes.auth.keys[-1]))
        assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
        # A stranger's kid refetches at most once a second, so it cannot hammer auth.
        clock.advance(1.5)
        calls = fakes.auth.jwks_calls
        for _ in range(5):
            err = await _error(_run(gw, "what is 1 + 1", mint(SigningKey("k9"))))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            clock.advance(0.1)
        assert fakes.auth.jwks_calls == calls + 1
        clock.advance(0.6)  # a second after the last refetch
        await _error(_run(gw, "what is 1 + 1", mint(SigningKey("k9"))))
        assert fakes.auth.jwks_calls == calls + 2
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


async def test_many_requests_with_a_rotated_key_at_once_all_pass() -> None:
    fakes = Fakes()
    inner, gateway, channel, gw = await start_gateway(
        fakes, auth_refresh_s=300, auth_staleness_s=600
    )
    try:
        await gw.wait_ready()
        fakes.auth.keys.append(SigningKey("k2"))
        token = mint(fakes.auth.keys[-1])
        replies = await asyncio.gather(*(_run(gw, f"what is {i} + 1", token) for i in range(8)))
        assert {r.outcome for r in replies} == {gateway_pb2.OUTCOME_TOOL_ANSWERED}
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


async def test_garbage_from_auth_keeps_the_last_good_state_and_the_loop_alive(
    gw: GatewayUnderTest,
) -> None:
    auth = gw.fakes.auth
    good_keys = auth.keys
    auth.keys = []  # an empty JWKS is refused as a refresh, not applied
    calls = auth.jwks_calls
    await eventually(lambda: auth.jwks_calls >= calls + 3)  # two refreshes saw it
    assert (await _run(gw, "what is 1 + 1", mint(good_keys[-1]))).answer
    auth.keys = [SigningKey("k5")]
    calls = auth.jwks_calls
    await eventually(lambda: auth.jwks_calls >= calls + 3)  # the loop is still refreshing
    reply = await _run(gw, "what is 1 + 1", mint(gw.fakes.auth.keys[-1]))
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED


async def test_auth_down_at_start_then_stale_fails_closed() -> None:
    fakes = Fakes()
    fakes.auth.down = True
    clock = ManualClock()
    inner, gateway, channel, gw = await start_gateway(fakes, clock=clock, auth_staleness_s=0.5)
    try:
        err = await _error(_run(gw, "what is 1 + 1"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # started anyway, no state yet
        fakes.auth.down = False
        await ready_once_auth_is_back(gw, clock)
        await _run(gw, "what is 1 + 1")
        fakes.auth.down = True
        refused = fakes.auth.refused
        await eventually(lambda: fakes.auth.refused > refused)  # a refresh failed
        clock.advance(0.5)
        await _run(gw, "what is 1 + 1")  # the last state is as old as allowed: still used
        clock.advance(0.01)
        err = await _error(_run(gw, "what is 1 + 1"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


async def test_list_tools_shows_only_the_allowlist(gw: GatewayUnderTest) -> None:
    everything = await gw.stub.ListTools(
        gateway_pb2.ListToolsRequest(), metadata=bearer(gw.token())
    )
    assert {t.name: t.side_effect for t in everything.tools} == {
        "calculator": "read_only",
        "save_note": "write",
    }
    small = await gw.stub.ListTools(
        gateway_pb2.ListToolsRequest(), metadata=bearer(gw.token(tenant="small"))
    )
    assert [t.name for t in small.tools] == ["calculator"]
    none = await gw.stub.ListTools(
        gateway_pb2.ListToolsRequest(), metadata=bearer(gw.token(tenant="stranger"))
    )
    assert list(none.tools) == []


async def test_history_is_the_callers_tenant_only(gw: GatewayUnderTest) -> None:
    await _run(gw, "what is 1 + 1", session_id="shared")
    mine = await gw.stub.GetHistory(
        gateway_pb2.GetHistoryRequest(session_id="shared"), metadata=bearer(gw.token())
    )
    assert [t.content for t in mine.turns] == ["what is 1 + 1", "calculator says 391"]
    # Another tenant's session answers exactly as a session that does not exist.
    theirs = await _error(
        gw.stub.GetHistory(
            gateway_pb2.GetHistoryRequest(session_id="shared"),
            metadata=bearer(gw.token(tenant="small")),
        )
    )
    missing = await _error(
        gw.stub.GetHistory(
            gateway_pb2.GetHistoryRequest(session_id="never-used"), metadata=bearer(gw.token())
        )
    )
    assert theirs.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert theirs.details() == missing.details()
    err = await _error(
        gw.stub.GetHistory(
            gateway_pb2.GetHistoryRequest(session_id="shared", limit=5000),
            metadata=bearer(gw.token()),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in (err.details() or "")


async def test_stats_need_ops_read(gw: GatewayUnderTest) -> None:
    request = gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_SERVICE)
    reply = await gw.stub.GetStats(request, metadata=bearer(gw.token()))
    assert [row.service for row in reply.rows] == ["toolmesh-gateway"]
    err = await _error(gw.stub.GetStats(request, metadata=bearer(gw.token(scope="tools:read"))))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ops:read" in (err.details() or "")


async def test_issue_token_forwards_and_passes_status_codes_through(gw: GatewayUnderTest) -> None:
    reply = await gw.stub.IssueToken(
        gateway_pb2.IssueTokenRequest(client_id="dev", client_secret="s3cret"), timeout=5
    )
    assert reply.token_type == "Bearer"
    answered = await _run(gw, "what is 3 * 3", reply.access_token)
    assert answered.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    err = await _error(
        gw.stub.IssueToken(
            gateway_pb2.IssueTokenRequest(client_id="dev", client_secret="wrong"), timeout=5
        )
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid client credentials"


async def test_service_info_names_the_gateway_contract(gw: GatewayUnderTest) -> None:
    reply = await gw.stub.GetServiceInfo(
        gateway_pb2.GetServiceInfoRequest(), metadata=bearer(gw.token())
    )
    assert reply.info.service == "gateway"
    assert list(reply.info.contract_versions) == ["toolmesh.gateway.v1"]


async def test_tokens_never_reach_the_logs(
    gw: GatewayUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    token = gw.token(jti="logged?")
    with caplog.at_level("DEBUG"):
        await _run(gw, "what is 1 + 1", token)
        await _error(_run(gw, "what is 1 + 1", token + "x"))
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert token not in text


async def test_a_dependency_down_is_named_without_its_address() -> None:
    fakes = Fakes()
    inner, gateway, channel, gw = await start_gateway(fakes)
    try:
        await gw.wait_ready()
        await inner.stop(0)
        err = await _error(
            gw.stub.GetHistory(
                gateway_pb2.GetHistoryRequest(session_id="s"), metadata=bearer(gw.token())
            )
        )
        assert (err.code(), err.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "memory is unavailable",
        )
        err = await _error(
            gw.stub.IssueToken(gateway_pb2.IssueTokenRequest(client_id="dev", client_secret="x"))
        )
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "auth is unavailable")
    finally:
        await channel.close()
        await gateway.stop(0)
