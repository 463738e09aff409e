"""CallTool: the tool the caller chose, through the same governed pipeline as Run."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from tests.unit.gateway.conftest import GatewayUnderTest, bearer
from toolmesh.gateway.v1 import gateway_pb2

CALL_TOOL = "/toolmesh.gateway.v1.Gateway/CallTool"


async def _call(
    gw: GatewayUnderTest, token: str = "", **fields: str
) -> gateway_pb2.CallToolResponse:
    request = gateway_pb2.CallToolRequest(**{"tool": "calculator", **fields})
    return await gw.stub.CallTool(request, metadata=bearer(token or gw.token()), timeout=5)


async def _refused(gw: GatewayUnderTest, token: str = "", **fields: str) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as err:
        await _call(gw, token, **fields)
    return err.value


async def _eventually(check: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_read_tool_answers_and_is_accounted_as_one_call(gw: GatewayUnderTest) -> None:
    reply = await _call(gw, arguments_json='{"expression": "17 * 23"}')
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert (reply.tool_name, reply.tool_version) == ("calculator", "1.0.0")
    assert reply.answer == "calculator says 391" and reply.result_json == '{"value": 391}'
    assert (reply.usage.tool_calls, reply.usage.cost_units, reply.usage.tokens_in) == (1, 2, 0)
    assert reply.cost_micros > 0
    invocation = gw.fakes.router.invocations[-1]
    assert (invocation.tool_version, invocation.idempotency_key) == ("1.0.0", "")
    await _eventually(
        lambda: any(u.request_id == reply.request_id for u in gw.fakes.telemetry.usage)
    )
    usage = next(u for u in gw.fakes.telemetry.usage if u.request_id == reply.request_id)
    assert (usage.route, usage.tool_name, usage.outcome) == (CALL_TOOL, "calculator", "ok")
    # Outside a session a call leaves no turns.
    assert gw.fakes.memory.turns == {}


async def test_a_call_in_a_session_is_remembered(gw: GatewayUnderTest) -> None:
    reply = await _call(gw, arguments_json='{"expression": "1+1"}', session_id="agent-7")
    turns = gw.fakes.memory.turns[("acme", "agent-7")]
    assert [t.content for t in turns] == [
        '[call calculator@1.0.0] {"expression": "1+1"}',
        reply.answer,
    ]


async def test_a_write_tool_needs_an_idempotency_key_and_tools_write(gw: GatewayUnderTest) -> None:
    err = await _refused(gw, tool="save_note", arguments_json='{"text": "x"}')
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (err.details() or "")
    reader = gw.token(scope="tools:read")
    err = await _refused(gw, reader, tool="save_note", idempotency_key="k-1")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tools:write" in (err.details() or "")
    assert not gw.fakes.router.invocations
    await _eventually(
        lambda: any(e.action == "permission.denied" for e in gw.fakes.telemetry.audit)
    )
    reply = await _call(gw, tool="save_note", arguments_json='{"text": "x"}', idempotency_key="k-1")
    assert gw.fakes.router.invocations[-1].idempotency_key == reply.request_id
    again = await _call(gw, tool="save_note", arguments_json='{"text": "x"}', idempotency_key="k-1")
    assert again.replayed and len(gw.fakes.router.invocations) == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"arguments_json": "[1, 2]"}, "arguments_json"),
        ({"arguments_json": '{"a": NaN}'}, "arguments_json"),
        ({"tool": "bad name!"}, "tool"),
        ({"version": "one"}, "version"),
        ({"session_id": "bad session"}, "session_id"),
    ],
)
async def test_bad_input_names_the_field_and_reaches_nobody(
    gw: GatewayUnderTest, fields: dict[str, str], field: str
) -> None:
    err = await _refused(gw, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(field)
    assert not gw.fakes.router.invocations


async def test_an_unknown_or_disallowed_tool_is_not_found(gw: GatewayUnderTest) -> None:
    assert (await _refused(gw, tool="nope")).code() == grpc.StatusCode.NOT_FOUND
    assert (await _refused(gw, version="9.9.9")).code() == grpc.StatusCode.NOT_FOUND
    small = gw.token(tenant="small")  # allowed only the calculator
    err = await _refused(gw, small, tool="save_note", idempotency_key="k")
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_a_tool_that_declines_is_an_outcome_not_an_error(gw: GatewayUnderTest) -> None:
    gw.fakes.router.tool_error = True
    reply = await _call(gw)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ERROR
    assert reply.answer == "unknown timezone" and not reply.degraded


async def test_arguments_the_tool_refuses_come_back_with_their_details(
    gw: GatewayUnderTest,
) -> None:
    gw.fakes.router.invoke_error = (grpc.StatusCode.INVALID_ARGUMENT, "expression: required")
    call = gw.stub.CallTool(
        gateway_pb2.CallToolRequest(tool="calculator"), metadata=bearer(gw.token()), timeout=5
    )
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "expression: required"


async def test_a_failing_tool_gives_the_contract_fallback(gw: GatewayUnderTest) -> None:
    gw.fakes.router.invoke_error = (grpc.StatusCode.INTERNAL, "boom")
    reply = await _call(gw)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert reply.answer == "The calculator is unavailable."
    assert list(reply.degraded) == ["tool:calculator"]


async def test_call_needs_authentication(gw: GatewayUnderTest) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await gw.stub.CallTool(gateway_pb2.CallToolRequest(tool="calculator"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not gw.fakes.router.invocations
