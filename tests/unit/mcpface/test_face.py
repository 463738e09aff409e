"""The MCP face as a real process, spoken to with the official `mcp` SDK client, in front of a
real gateway (in-process) and the contract fakes: the same allowlists, scopes, idempotency,
budgets and audit as a gRPC caller."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import grpc
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from mcpface.mapping import default_session
from tests.faceproc import mcp_session
from tests.unit.mcpface.conftest import Faced


async def _eventually(check: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_list_shows_the_contracts_and_call_runs_the_governed_pipeline(faced: Faced) -> None:
    async with mcp_session(faced.face.url, faced.token(sub="lister")) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert set(listed) == {"calculator", "save_note"}
        calculator = listed["calculator"]
        assert calculator.title == "calculator@1.0.0"
        assert calculator.description == "Evaluates an arithmetic expression."
        assert calculator.input_schema["required"] == ["expression"]
        assert calculator.annotations is not None and calculator.annotations.read_only_hint
        assert listed["save_note"].annotations.read_only_hint is False  # type: ignore[union-attr]
        assert calculator.meta == {
            "toolmesh/version": "1.0.0",
            "toolmesh/sideEffect": "read_only",
            "toolmesh/backend": "builtin",
            "toolmesh/costUnits": 2,
        }
        result = await session.call_tool("calculator", {"expression": "17 * 23"})
    assert not result.is_error
    assert result.structured_content == {"value": 391}
    assert _text(result).startswith("calculator says 391")
    meta = result.meta or {}
    assert meta["toolmesh/tool"] == "calculator@1.0.0"
    assert meta["toolmesh/outcome"] == "tool_answered" and meta["toolmesh/costMicros"] > 0
    invocation = faced.gw.fakes.router.invocations[-1]
    assert json.loads(invocation.arguments_json) == {"expression": "17 * 23"}
    assert (invocation.caller.tenant, invocation.caller.subject) == ("acme", "lister")
    # Accounted like any CallTool: one usage record on the CallTool route.
    request_id = meta["toolmesh/requestId"]
    await _eventually(lambda: any(u.request_id == request_id for u in faced.ledger.usage))
    usage = next(u for u in faced.ledger.usage if u.request_id == request_id)
    assert (usage.route, usage.tool_name) == ("/toolmesh.gateway.v1.Gateway/CallTool", "calculator")


async def test_a_tenant_sees_and_calls_only_its_allowed_tools(faced: Faced) -> None:
    async with mcp_session(faced.face.url, faced.token(tenant="small")) as session:
        assert [t.name for t in (await session.list_tools()).tools] == ["calculator"]
        with pytest.raises(MCPError) as err:
            await session.call_tool(
                "save_note", {"text": "x"}, meta={"toolmesh/idempotencyKey": "k-small"}
            )
    assert err.value.code == types.INVALID_PARAMS
    assert "Unknown tool: save_note" in err.value.message


async def test_a_read_only_token_neither_sees_nor_runs_a_write_tool(faced: Faced) -> None:
    calls = len(faced.gw.fakes.router.invocations)
    reader = faced.token(scope="tools:read", sub="reader")
    async with mcp_session(faced.face.url, reader) as session:
        assert [t.name for t in (await session.list_tools()).tools] == ["calculator"]
        result = await session.call_tool(
            "save_note", {"text": "x"}, meta={"toolmesh/idempotencyKey": "k-reader"}
        )
    assert result.is_error
    assert "Not allowed to call save_note" in _text(result) and "tools:write" in _text(result)
    assert (result.meta or {})["toolmesh/code"] == "PERMISSION_DENIED"
    assert len(faced.gw.fakes.router.invocations) == calls
    await _eventually(
        lambda: any(
            e.action == "permission.denied" and e.actor == "reader" for e in faced.ledger.audit
        )
    )


async def test_a_write_needs_a_caller_chosen_key_runs_once_and_is_audited(faced: Faced) -> None:
    router = faced.gw.fakes.router
    async with mcp_session(faced.face.url, faced.token(sub="writer")) as session:
        refused = await session.call_tool("save_note", {"text": "buy milk"})
        assert refused.is_error
        assert '"toolmesh/idempotencyKey"' in _text(refused)
        calls = len(router.invocations)
        meta = {"toolmesh/idempotencyKey": "note-1"}
        first = await session.call_tool("save_note", {"text": "buy milk"}, meta=meta)
        again = await session.call_tool("save_note", {"text": "buy milk"}, meta=meta)
        other = await session.call_tool("save_note", {"text": "buy tea"}, meta=meta)
    assert not first.is_error and (first.meta or {})["toolmesh/replayed"] is False
    assert not again.is_error and (again.meta or {})["toolmesh/replayed"] is True
    assert len(router.invocations) == calls + 1
    assert router.invocations[-1].idempotency_key == (first.meta or {})["toolmesh/requestId"]
    # The same key for other content is refused, with the reason.
    assert other.is_error and "already used for a different request" in _text(other)
    await _eventually(
        lambda: any(e.action == "tool.write" and e.actor == "writer" for e in faced.ledger.audit)
    )
    write = next(e for e in faced.ledger.audit if e.action == "tool.write" and e.actor == "writer")
    assert (write.target, write.outcome) == ("save_note", "success")


async def test_over_budget_is_a_tool_error_naming_the_budget(faced: Faced) -> None:
    faced.ledger.limits[("acme", "thrifty")] = 1
    async with mcp_session(faced.face.url, faced.token(sub="thrifty")) as session:
        first = await session.call_tool("calculator", {"expression": "1 + 1"})
        assert not first.is_error
        await _eventually(lambda: faced.ledger.used.get(("acme", "thrifty"), 0) == 1)
        refused = await session.call_tool("calculator", {"expression": "2 + 2"})
    assert refused.is_error
    assert "over budget" in _text(refused) and "tool_calls limit 1" in _text(refused)
    meta = refused.meta or {}
    assert meta["toolmesh/code"] == "RESOURCE_EXHAUSTED" and meta["toolmesh/retryAfterSeconds"] > 0
    await _eventually(
        lambda: any(
            e.action == "budget.denied" and e.actor == "thrifty" for e in faced.ledger.audit
        )
    )


async def test_a_session_named_in_meta_remembers_the_call(faced: Faced) -> None:
    async with mcp_session(faced.face.url, faced.token()) as session:
        result = await session.call_tool(
            "calculator", {"expression": "1+1"}, meta={"toolmesh/sessionId": "ide-42"}
        )
        bad = await session.call_tool(
            "calculator", {"expression": "1+1"}, meta={"toolmesh/sessionId": "not a session!"}
        )
    turns = faced.gw.fakes.memory.turns[("acme", "ide-42")]
    assert [t.content for t in turns] == [
        '[call calculator@1.0.0] {"expression": "1+1"}',
        _text(result).split(" {")[0],
    ]
    assert bad.is_error and '_meta "toolmesh/sessionId"' in _text(bad)


async def test_a_call_naming_no_session_is_remembered_in_the_callers_default_one(
    faced: Faced,
) -> None:
    """MCP clients rarely name a session; the notes tools need one (the face's choice)."""
    router = faced.gw.fakes.router
    async with mcp_session(faced.face.url, faced.token(sub="ide-user")) as session:
        first = await session.call_tool("calculator", {"expression": "2+2"})
        assert router.invocations[-1].session_id == "mcp:ide-user"
    # Another MCP connection of the same caller: the same session.
    async with mcp_session(faced.face.url, faced.token(sub="ide-user")) as session:
        await session.call_tool("calculator", {"expression": "3+3"})
        assert router.invocations[-1].session_id == "mcp:ide-user"
    async with mcp_session(faced.face.url, faced.token(sub="someone else")) as session:
        await session.call_tool("calculator", {"expression": "4+4"})
        assert router.invocations[-1].session_id == default_session("someone else")
    assert not first.is_error
    turns = faced.gw.fakes.memory.turns[("acme", "mcp:ide-user")]
    assert [t.content for t in turns][:2] == [
        '[call calculator@1.0.0] {"expression": "2+2"}',
        _text(first).split(" {")[0],
    ]
    assert len(turns) == 4


def test_the_default_session_is_a_valid_session_id_for_any_subject() -> None:
    valid = re.compile(r"[A-Za-z0-9._:-]{1,128}")
    assert default_session("alice") == "mcp:alice"
    for subject in ("someone else", "é" * 10, "x" * 200, "a/b@c", "\ud800"):
        session = default_session(subject)
        assert valid.fullmatch(session) and session.startswith("mcp:"), subject
        assert session == default_session(subject), "stable"
    assert default_session("a/b") != default_session("a/c")


async def test_tool_errors_refusals_and_fallbacks_are_is_error_results(faced: Faced) -> None:
    router = faced.gw.fakes.router
    async with mcp_session(faced.face.url, faced.token()) as session:
        try:
            router.tool_error = True
            declined = await session.call_tool("calculator", {"expression": "x"})
            router.tool_error = False
            router.invoke_error = (grpc.StatusCode.INVALID_ARGUMENT, "expression: required")
            invalid = await session.call_tool("calculator", {})
            router.invoke_error = (grpc.StatusCode.INTERNAL, "boom")
            fallback = await session.call_tool("calculator", {"expression": "1"})
        finally:
            router.tool_error = False
            router.invoke_error = None
        wrong_meta = await session.call_tool(
            "calculator", {"expression": "1"}, meta={"toolmesh/version": 1}
        )
    assert declined.is_error and _text(declined) == "unknown timezone"
    assert (declined.meta or {})["toolmesh/outcome"] == "tool_error"
    assert invalid.is_error and "Invalid call of calculator" in _text(invalid)
    assert "expression: required" in _text(invalid)
    assert fallback.is_error and _text(fallback) == "The calculator is unavailable."
    assert (fallback.meta or {})["toolmesh/degraded"] == ["tool:calculator"]
    assert wrong_meta.is_error and "must be a string" in _text(wrong_meta)


def _post(url: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            },
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


async def test_no_token_or_a_bad_one_is_http_401_with_a_bearer_challenge(faced: Faced) -> None:
    status, headers, _ = await asyncio.to_thread(_post, faced.face.url, None)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="toolmesh"'
    forged = faced.token() + "x"
    status, headers, body = await asyncio.to_thread(_post, faced.face.url, forged)
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer realm="toolmesh", error="invalid_token"')
    assert json.loads(body)["error"] == "invalid_token"
    # The SDK client (without an OAuth provider to re-authenticate with) cannot initialize.
    with pytest.raises(ExceptionGroup) as refused:
        async with mcp_session(faced.face.url, None):
            pass
    assert refused.group_contains(MCPError)
    status, _, _ = await asyncio.to_thread(_post, faced.face.url, faced.token())
    assert status == 200


async def test_a_token_revoked_after_it_was_let_in_is_refused_then_gets_401(
    faced: Faced,
) -> None:
    jti = "revoked-later"
    token = faced.token(jti=jti)
    async with mcp_session(faced.face.url, token) as session:
        assert not (await session.call_tool("calculator", {"expression": "1"})).is_error
        faced.gw.fakes.auth.revoked.add(jti)
        # The gateway learns of the revocation on its next refresh (0.1 s here).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:
                await session.call_tool("calculator", {"expression": "1"})
            except MCPError as err:
                assert err.code == types.INVALID_REQUEST and "unauthenticated" in err.message
                break
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
    status, _, _ = await asyncio.to_thread(_post, faced.face.url, token)
    assert status == 401


async def test_health_readiness_and_no_token_in_the_logs(faced: Faced) -> None:
    # Blocking HTTP off the loop: readiness asks the gateway, which this loop serves.
    assert await asyncio.to_thread(faced.face.get, "/healthz") == (200, {"status": "ok"})
    ready = await asyncio.to_thread(faced.face.ready)
    assert ready == (200, {"ready": True, "reason": "gateway serving"})
    token = faced.token(sub="hygiene")
    async with mcp_session(faced.face.url, token) as session:
        await session.call_tool("calculator", {"expression": "1"})
    await asyncio.to_thread(_post, faced.face.url, token + "x")
    text = faced.face.log_path.read_text()
    assert token not in text and token.split(".")[2] not in text
    calls = [r for r in faced.face.records() if r.get("message") == "tools/call"]
    assert calls and {"tool", "result", "duration_ms"} <= set(calls[-1])
