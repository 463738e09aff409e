"""The router over gRPC: a real server in-process, real SQLite (and PostgreSQL) storage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from opentelemetry.trace import StatusCode

from tests.unit.router.harness import CALLER, RouterServer, router_settings, start_router
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc


def invoke_request(
    tool: str, arguments: dict[str, Any], **fields: Any
) -> router_pb2.InvokeToolRequest:
    base: dict[str, Any] = {
        "caller": CALLER,
        "request_id": "req-1",
        "session_id": "sess-1",
        "tool_name": tool,
        "tool_version": "1.0.0",
        "arguments_json": json.dumps(arguments),
        "allowed_tools": ["*"],
    }
    return router_pb2.InvokeToolRequest(**{**base, **fields})


async def invoke_error(
    router: RouterServer, request: router_pb2.InvokeToolRequest, timeout: float = 5
) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await router.stub.InvokeTool(request, timeout=timeout)
    return caught.value


def field_violations(error: aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


async def test_route_picks_the_calculator_with_arguments(router: RouterServer) -> None:
    reply = await router.stub.Route(
        router_pb2.RouteRequest(
            caller=CALLER, request_id="r", prompt="what is 17 * 23", allowed_tools=["*"]
        ),
        timeout=5,
    )
    assert reply.matched
    assert reply.tool.name == "calculator" and reply.tool.version == "1.1.0"
    assert reply.tool.side_effect == router_pb2.SIDE_EFFECT_READ_ONLY
    assert json.loads(reply.arguments_json) == {"expression": "17 * 23"}
    assert reply.confidence >= reply.threshold == 0.6
    assert reply.parts.intent == pytest.approx(1.0)
    assert reply.parts.schema_fit == 1.0 and reply.parts.health == 1.0
    assert reply.rules_version == "2026.11.29-1"
    assert reply.candidates[0].tool_name == "calculator"
    assert len(reply.candidates) == 5
    assert "calculator scored" in reply.reason


async def test_route_below_threshold_says_why(router: RouterServer) -> None:
    reply = await router.stub.Route(
        router_pb2.RouteRequest(caller=CALLER, prompt="blorp fizzle", allowed_tools=["*"]),
        timeout=5,
    )
    assert not reply.matched
    assert not reply.HasField("tool") and reply.arguments_json == ""
    assert reply.reason.startswith("no tool is confident enough")


async def test_route_refuses_an_oversized_prompt(router: RouterServer) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await router.stub.Route(
            router_pb2.RouteRequest(caller=CALLER, prompt="7" * 8001, allowed_tools=["*"]),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"prompt": "longer than 8000 characters"}


async def test_route_scores_only_allowed_tools(router: RouterServer) -> None:
    reply = await router.stub.Route(
        router_pb2.RouteRequest(caller=CALLER, prompt="what is 17 * 23"), timeout=5
    )
    assert not reply.matched and list(reply.candidates) == []
    reply = await router.stub.Route(
        router_pb2.RouteRequest(
            caller=CALLER, prompt="what is 17 * 23", allowed_tools=["save_note"]
        ),
        timeout=5,
    )
    assert [c.tool_name for c in reply.candidates] == ["save_note"]


async def test_route_then_invoke_the_calculator(router: RouterServer) -> None:
    route = await router.stub.Route(
        router_pb2.RouteRequest(caller=CALLER, prompt="what is 17 * 23", allowed_tools=["*"]),
        timeout=5,
    )
    reply = await router.stub.InvokeTool(
        invoke_request(
            route.tool.name, json.loads(route.arguments_json), tool_version=route.tool.version
        ),
        timeout=5,
    )
    assert json.loads(reply.result_json) == {"expression": "17 * 23", "value": "391", "exact": True}
    assert reply.answer == "17 * 23 = 391"
    assert (reply.tool_name, reply.tool_version, reply.cost_units) == ("calculator", "1.1.0", 1)
    assert not reply.replayed


async def test_invoke_unit_convert_and_current_time(router: RouterServer) -> None:
    reply = await router.stub.InvokeTool(
        invoke_request("unit_convert", {"value": 100, "from_unit": "f", "to_unit": "c"}),
        timeout=5,
    )
    assert json.loads(reply.result_json)["result"] == pytest.approx(37.77777778)
    reply = await router.stub.InvokeTool(
        invoke_request("current_time", {"zone": "Tokyo"}), timeout=5
    )
    result = json.loads(reply.result_json)
    assert result["zone"] == "Asia/Tokyo" and result["utc_offset"] == "+09:00"


async def test_every_tool_run_is_an_execute_tool_span(router: RouterServer) -> None:
    await router.stub.InvokeTool(
        invoke_request("calculator", {"expression": "1+1"}, request_id="req-span"), timeout=5
    )
    (span,) = router.spans.get_finished_spans()
    assert span.name == "execute_tool calculator"
    expected = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "calculator",
        "gen_ai.tool.type": "function",
        "gen_ai.tool.call.id": "req-span",
        "toolmesh.tool.version": "1.0.0",
        "toolmesh.tool.side_effect": "read_only",
        "toolmesh.tenant": "acme",
    }
    attributes = dict(span.attributes or {})
    assert {key: attributes.get(key) for key in expected} == expected
    assert span.status.status_code is StatusCode.UNSET


async def test_schema_violation_names_the_json_path(router: RouterServer) -> None:
    error = await invoke_error(
        router, invoke_request("unit_convert", {"value": "ten", "from_unit": "km"})
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert set(violations) == {"arguments_json", "arguments_json.value"}
    assert "'to_unit' is a required property" in violations["arguments_json"]
    assert "ten" not in error.details()
    assert router.spans.get_finished_spans() == ()


async def test_malformed_json_and_missing_fields_are_invalid(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("calculator", {}, arguments_json="{nope"))
    assert field_violations(error) == {"arguments_json": "is not valid JSON"}
    error = await invoke_error(
        router, invoke_request("unit_convert", {}, arguments_json='{"value": NaN}')
    )
    assert field_violations(error) == {"arguments_json": "is not valid JSON"}
    error = await invoke_error(
        router, invoke_request("calculator", {}, caller=None, tool_version="")
    )
    assert set(field_violations(error)) == {"caller.tenant", "tool_version"}
    error = await invoke_error(router, invoke_request("list_notes", {}, session_id="s" * 129))
    assert field_violations(error) == {"session_id": "longer than 128 characters"}


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("calculator", {"expression": "1 / 0"}, "calculator: division by zero"),
        ("calculator", {"expression": "9 ** 9 ** 9"}, "calculator: result is too large"),
        ("current_time", {"zone": "Mars/Olympus"}, "unknown time zone"),
        ("unit_convert", {"value": 1, "from_unit": "km", "to_unit": "kg"}, "cannot convert"),
        ("unit_convert", {"value": 1.7e308, "from_unit": "kg", "to_unit": "lb"}, "too large"),
    ],
)
async def test_bad_arguments_found_by_the_tool_are_invalid_argument(
    router: RouterServer, tool: str, arguments: dict[str, Any], message: str
) -> None:
    error = await invoke_error(router, invoke_request(tool, arguments))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    (span,) = router.spans.get_finished_spans()
    # The caller erred, not the tool: marked, but not counted against the tool's health.
    assert span.attributes is not None and span.attributes["error.type"] == "invalid_argument"
    assert span.status.status_code is StatusCode.UNSET


async def test_write_tool_needs_an_idempotency_key(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("save_note", {"text": "order coffee"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == {"idempotency_key": "required for the write tool save_note"}


async def test_save_note_is_idempotent(router: RouterServer) -> None:
    request = invoke_request("save_note", {"text": "order more coffee"}, idempotency_key="k-1")
    first = await router.stub.InvokeTool(request, timeout=5)
    again = await router.stub.InvokeTool(request, timeout=5)
    assert not first.replayed and again.replayed
    assert first.result_json == again.result_json
    assert first.answer == "Saved your note: order more coffee"
    notes = await router.stub.InvokeTool(invoke_request("list_notes", {}), timeout=5)
    assert [n["text"] for n in json.loads(notes.result_json)["notes"]] == ["order more coffee"]
    spans = router.spans.get_finished_spans()
    assert [s.attributes.get("toolmesh.tool.replayed") for s in spans if s.attributes] == [
        None,
        True,
        None,
    ]


async def test_an_idempotency_key_reused_for_another_note_is_refused(
    router: RouterServer,
) -> None:
    await router.stub.InvokeTool(
        invoke_request("save_note", {"text": "one"}, idempotency_key="k-2"), timeout=5
    )
    error = await invoke_error(
        router, invoke_request("save_note", {"text": "two"}, idempotency_key="k-2")
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already used for a different note" in (error.details() or "")


async def test_notes_are_scoped_by_tenant_and_session(router: RouterServer) -> None:
    await router.stub.InvokeTool(
        invoke_request("save_note", {"text": "secret plan"}, idempotency_key="k-3"), timeout=5
    )
    other_tenant = type(CALLER)(subject="x", tenant="globex")
    for request in (
        invoke_request("list_notes", {}, caller=other_tenant),
        invoke_request("list_notes", {}, session_id="sess-2"),
    ):
        reply = await router.stub.InvokeTool(request, timeout=5)
        assert json.loads(reply.result_json) == {"notes": []}
    error = await invoke_error(router, invoke_request("list_notes", {}, session_id=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id is required" in (error.details() or "")


async def test_a_slow_tool_times_out_at_its_contract_timeout(router: RouterServer) -> None:
    # The router's error, not the caller's 30 s deadline, ended the call.
    error = await invoke_error(
        router, invoke_request("slow_tool", {}, tool_version="0.1.0"), timeout=30
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == "tool slow_tool did not finish within 400 ms"
    (span,) = router.spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "deadline_exceeded"


async def _eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_the_callers_deadline_caps_the_tool_timeout(router: RouterServer) -> None:
    # slow_tool allows 400 ms; with 250 ms left the router gives it 250 ms less its reserve.
    error = await invoke_error(
        router, invoke_request("slow_tool", {}, tool_version="0.1.0"), timeout=0.25
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _eventually(lambda: bool(router.spans.get_finished_spans()))
    (span,) = router.spans.get_finished_spans()
    # The router stopped the tool itself, before the caller's deadline cancelled the call;
    # the short deadline was the caller's, so it does not count against the tool.
    assert span.attributes is not None and span.attributes["error.type"] == "deadline_exceeded"
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time is not None and span.start_time is not None
    # Capped by the caller's 250 ms, not by the tool's own 400 ms.
    assert (span.end_time - span.start_time) / 1e9 < 0.4


async def test_unknown_tool_or_version_is_not_found(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("teleport", {}))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "tool teleport is not registered"
    error = await invoke_error(router, invoke_request("calculator", {}, tool_version="9.9.9"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "tool calculator has no version 9.9.9"


async def test_tools_off_the_allowlist_are_denied(router: RouterServer) -> None:
    for allowed in ([], ["save_note"]):
        error = await invoke_error(
            router,
            invoke_request("calculator", {"expression": "1+1"}, allowed_tools=allowed),
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "calculator is not on the caller's allowed tools" in (error.details() or "")


async def test_a_tool_that_breaks_its_output_contract_is_internal(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("broken_tool", {}, tool_version="0.1.0"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "tool broken_tool returned a result outside its contract"
    (span,) = router.spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR


async def test_a_crashing_tool_is_internal_without_leaking(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("crash_tool", {}, tool_version="0.1.0"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (error.details() or "")
    assert (error.details() or "").startswith("tool crash_tool failed (incident ")


async def test_a_failing_tool_trips_its_circuit_breaker(tmp_path: Path) -> None:
    settings = router_settings(tmp_path, breaker_min_calls=3, breaker_window=3)
    async for router in start_router(settings):
        # The caller's mistakes never open a tool's circuit.
        for _ in range(4):
            error = await invoke_error(router, invoke_request("calculator", {"expression": "1/0"}))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        crash = invoke_request("crash_tool", {}, tool_version="0.1.0")
        for _ in range(3):
            assert (await invoke_error(router, crash)).code() == grpc.StatusCode.INTERNAL
        error = await invoke_error(router, crash)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "circuit open" in (error.details() or "")
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert 9 <= retry.retry_delay.seconds <= 10
        assert len(router.spans.get_finished_spans()) == 4 + 3  # refused calls never ran
        # Other tools are unaffected.
        await router.stub.InvokeTool(invoke_request("calculator", {"expression": "1+1"}), timeout=5)


async def test_results_over_the_size_cap_are_refused(router: RouterServer) -> None:
    error = await invoke_error(router, invoke_request("huge_tool", {}, tool_version="0.1.0"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the 65536-byte cap" in (error.details() or "")


async def test_calls_over_the_concurrency_limit_are_refused_at_once(
    router: RouterServer,
) -> None:
    first = asyncio.ensure_future(
        router.stub.InvokeTool(invoke_request("gated_tool", {}, tool_version="0.1.0"), timeout=5)
    )
    await _eventually(lambda: router.tools.gated_calls == 1)
    error = await invoke_error(router, invoke_request("gated_tool", {}, tool_version="0.1.0"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # At once: refused while the first call still holds the only slot, not after waiting.
    assert not first.done() and router.tools.gated_calls == 1
    router.tools.gate.set()
    assert (await first).answer == "opened"


async def test_list_tools_and_service_info(router: RouterServer) -> None:
    listed = await router.stub.ListTools(router_pb2.ListToolsRequest(), timeout=5)
    names = {t.name for t in listed.tools}
    assert {"calculator", "unit_convert", "current_time", "save_note", "list_notes"} <= names
    allowed = await router.stub.ListTools(
        router_pb2.ListToolsRequest(allowed_tools=["save_note", "nope"]), timeout=5
    )
    (note,) = allowed.tools
    assert note.side_effect == router_pb2.SIDE_EFFECT_WRITE
    assert json.loads(note.input_schema_json)["required"] == ["text"]
    assert note.timeout_ms == 3000 and note.fallback_answer
    info = (await router.stub.GetServiceInfo(router_pb2.GetServiceInfoRequest(), timeout=5)).info
    assert info.service == "router"
    assert list(info.contract_versions) == ["toolmesh.router.v1"]


class FakeTelemetry(telemetry_pb2_grpc.TelemetryServicer):
    """Stands in for the telemetry service, which another team builds."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetToolHealth(
        self, request: telemetry_pb2.GetToolHealthRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetToolHealthResponse:
        self.calls += 1
        return telemetry_pb2.GetToolHealthResponse(
            tools=[
                telemetry_pb2.ToolHealth(
                    tool_name="current_time",
                    tool_version="1.0.0",
                    calls=10,
                    failures=4,
                    success_rate=0.6,
                ),
            ]
        )


@pytest.fixture
async def telemetry() -> AsyncIterator[tuple[aio.Server, FakeTelemetry, int]]:
    server = aio.server()
    fake = FakeTelemetry()
    telemetry_pb2_grpc.add_TelemetryServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield server, fake, port
    await server.stop(0)


async def _time_health(router: RouterServer) -> float:
    reply = await router.stub.Route(
        router_pb2.RouteRequest(
            caller=CALLER, prompt="time in Tokyo", allowed_tools=["current_time"]
        ),
        timeout=5,
    )
    return reply.candidates[0].parts.health


async def test_tool_health_comes_from_telemetry_in_the_background_and_survives_its_outage(
    tmp_path: Path, telemetry: tuple[aio.Server, FakeTelemetry, int]
) -> None:
    server, fake, port = telemetry
    interval = 0.3
    settings = router_settings(
        tmp_path, telemetry_target=f"127.0.0.1:{port}", health_refresh_s=interval
    )
    async for router in start_router(settings):
        for _ in range(100):
            if await _time_health(router) != 1.0:
                break
            await asyncio.sleep(0.05)
        assert await _time_health(router) == pytest.approx(0.6)
        calls, started = fake.calls, time.monotonic()
        for _ in range(10):
            await _time_health(router)
        # Refreshed on a timer, not per request: at most one refresh per interval elapsed.
        assert fake.calls - calls <= 1 + (time.monotonic() - started) / interval
        await server.stop(0)
        await asyncio.sleep(3 * interval)  # refreshes fail meanwhile
        assert await _time_health(router) == pytest.approx(0.6)


@pytest.mark.postgres
async def test_save_note_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    async for router in start_router(router_settings(tmp_path, database_url=postgres_url)):
        request = invoke_request("save_note", {"text": "order more coffee"}, idempotency_key="pg-1")
        first, again = await asyncio.gather(
            router.stub.InvokeTool(request, timeout=5), router.stub.InvokeTool(request, timeout=5)
        )
        assert sorted([first.replayed, again.replayed]) == [False, True]
        assert first.result_json == again.result_json
        listed = await router.stub.InvokeTool(invoke_request("list_notes", {}), timeout=5)
        assert len(json.loads(listed.result_json)["notes"]) == 1


@pytest.mark.parametrize(
    ("arguments_json", "problem"),
    [
        ('{"value": 1e400, "from_unit": "km", "to_unit": "mi"}', "number 1e400 cannot be carried"),
        ('{"value": 1e-400, "from_unit": "km", "to_unit": "mi"}', "number 1e-400 cannot"),
        (
            '{"value": 1.00000000000000000001, "from_unit": "km", "to_unit": "mi"}',
            "number 1.00000000000000000001 cannot",
        ),
    ],
)
async def test_json_numbers_a_double_cannot_carry_are_refused_not_changed(
    router: RouterServer, arguments_json: str, problem: str
) -> None:
    error = await invoke_error(
        router, invoke_request("unit_convert", {}, arguments_json=arguments_json)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in field_violations(error)["arguments_json"]


async def test_unit_convert_1_0_says_when_its_number_is_rounded_and_refuses_denormals(
    router: RouterServer,
) -> None:
    reply = await router.stub.InvokeTool(
        invoke_request("unit_convert", {"value": 10, "from_unit": "km", "to_unit": "miles"}),
        timeout=5,
    )
    assert reply.answer == "10 km ≈ 6.213711922 mi"
    assert json.loads(reply.result_json)["result"] == 6.213711922
    error = await invoke_error(
        router,
        invoke_request("unit_convert", {"value": 5e-320, "from_unit": "m", "to_unit": "km"}),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large or too small to represent as a number" in error.details()


async def test_unit_convert_1_1_reads_text_whole_and_answers_exactly(router: RouterServer) -> None:
    reply = await router.stub.InvokeTool(
        invoke_request(
            "unit_convert",
            {"value": "1e308", "from_unit": "km", "to_unit": "miles"},
            tool_version="1.1.0",
        ),
        timeout=5,
    )
    assert reply.answer == "1e308 km ≈ 6.213711922e307 mi"
    assert json.loads(reply.result_json) == {
        "value": "1e308",
        "from_unit": "km",
        "to_unit": "mi",
        "dimension": "length",
        "result": "6.213711922e307",
        "exact": False,
    }
    error = await invoke_error(
        router,
        invoke_request(
            "unit_convert",
            {"value": "1,5", "from_unit": "km", "to_unit": "mi"},
            tool_version="1.1.0",
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'1,5' is ambiguous" in error.details()


async def test_the_published_1_0_contracts_still_answer(router: RouterServer) -> None:
    reply = await router.stub.InvokeTool(
        invoke_request("calculator", {"expression": "2 ** 10"}), timeout=5
    )
    assert (reply.tool_version, reply.answer) == ("1.0.0", "2 ** 10 = 1024")
    error = await invoke_error(router, invoke_request("calculator", {"expression": "1e5"}))
    assert "arguments_json.expression" in field_violations(error)
