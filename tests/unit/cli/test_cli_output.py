"""What the CLI prints for replies and for errors, without a traceback in sight."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cli import output
from cli.main import main
from cli.up import address, child_environment
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

RUN = gateway_pb2.RunResponse(
    request_id="a" * 32,
    trace_id="b" * 32,
    answer="17 * 23 = 391",
    tool_name="calculator",
    tool_version="1.2.0",
    confidence=0.9312,
    confidence_parts=gateway_pb2.ConfidenceParts(intent=0.95, schema_fit=1.0, health=0.8),
    usage=common_pb2.Usage(tokens_in=5, tokens_out=4, tool_calls=1, cost_units=2),
    degraded=["memory"],
    outcome=gateway_pb2.OUTCOME_TOOL_ANSWERED,
)


def test_run_text_shows_answer_tool_confidence_ids_and_degraded() -> None:
    text = output.format_run(RUN)
    assert text.splitlines()[0] == "17 * 23 = 391"
    assert "calculator@1.2.0" in text
    assert "0.93 (intent 0.95, schema 1.00, health 0.80)" in text
    assert "tool answered" in text
    assert f"request id  {'a' * 32}" in text and f"trace id    {'b' * 32}" in text
    assert "degraded    memory" in text


def test_run_without_tool_or_degradation() -> None:
    text = output.format_run(
        gateway_pb2.RunResponse(answer="No tool", outcome=gateway_pb2.OUTCOME_NO_MATCH)
    )
    assert "tool        none" in text and "degraded    none" in text and "no match" in text


def test_json_uses_proto_field_names_and_prints_every_field() -> None:
    data = json.loads(output.as_json(RUN))
    assert data["tool_name"] == "calculator" and data["trace_id"] == "b" * 32
    assert data["usage"]["tokens_in"] == 5  # int64 as a number
    assert data["result_json"] == ""
    assert data["outcome"] == "OUTCOME_TOOL_ANSWERED"


def test_history_lines() -> None:
    reply = gateway_pb2.GetHistoryResponse(
        turns=[
            common_pb2.Turn(role=common_pb2.TURN_ROLE_USER, content="what is 2 + 2", seq=1),
            common_pb2.Turn(
                role=common_pb2.TURN_ROLE_ASSISTANT,
                content="4",
                seq=2,
                tool_name="calculator",
                tool_version="1.0.0",
            ),
        ]
    )
    assert output.format_history(reply).splitlines() == [
        "   1  user      what is 2 + 2",
        "   2  assistant 4  [calculator@1.0.0]",
    ]
    assert output.format_history(gateway_pb2.GetHistoryResponse()) == "(no turns)"


def test_tools_and_stats_tables() -> None:
    tools = gateway_pb2.ListToolsResponse(
        tools=[
            gateway_pb2.Tool(
                name="calculator",
                version="1.0.0",
                side_effect="read_only",
                cost_units=1,
                timeout_ms=500,
                description="Arithmetic",
            )
        ]
    )
    lines = output.format_tools(tools).splitlines()
    assert lines[0].split() == [
        "TOOL",
        "VERSION",
        "SIDE",
        "EFFECT",
        "BACKEND",
        "COST",
        "TIMEOUT",
        "DESCRIPTION",
    ]
    assert lines[1].split() == [
        "calculator",
        "1.0.0",
        "read_only",
        "builtin",
        "1",
        "500ms",
        "Arithmetic",
    ]
    stats = gateway_pb2.GetStatsResponse(
        rows=[
            telemetry_pb2.StatsRow(
                service="toolmesh-gateway",
                route="/toolmesh.gateway.v1.Gateway/Run",
                count=12,
                error_rate=0.25,
                p50_ms=2.5,
                p95_ms=9.0,
                p99_ms=12.25,
            )
        ]
    )
    lines = output.format_stats(stats, "route").splitlines()
    assert lines[0].split()[:2] == ["SERVICE", "ROUTE"]
    assert lines[1].split() == [
        "toolmesh-gateway",
        "/toolmesh.gateway.v1.Gateway/Run",
        "12",
        "25.0%",
        "2.5",
        "9.0",
        "12.2",
    ]
    assert output.format_stats(gateway_pb2.GetStatsResponse(), "tool") == "(no data in this window)"


class FakeCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed call as the sync client raises it, with an optional google.rpc status trailer."""

    def __init__(self, code: grpc.StatusCode, details: str, bad: list[tuple[str, str]]) -> None:
        self._code, self._details = code, details
        self._trailers: tuple[tuple[str, bytes], ...] = ()
        if bad:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in bad
                    ]
                )
            )
            status = status_pb2.Status(
                code=getattr(code_pb2, code.name), message=details, details=[detail]
            )
            self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def test_error_line_with_field_violations() -> None:
    err = FakeCall(
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt: must not be only whitespace",
        [("prompt", "must not be only whitespace")],
    )
    assert output.format_rpc_error(err).splitlines() == [
        "error: INVALID_ARGUMENT: prompt: must not be only whitespace",
        "  prompt: must not be only whitespace",
    ]


def test_error_line_without_details() -> None:
    err = FakeCall(grpc.StatusCode.UNAVAILABLE, "", [])
    assert output.format_rpc_error(err) == "error: UNAVAILABLE: no details"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_gateway_prints_one_error_line_and_exits_non_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"127.0.0.1:{_free_port()}"
    code = main(
        ["run", "hi", "--session", "s", "--token", "t", "--target", target, "--timeout", "1"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: UNAVAILABLE: ") or err.startswith("error: DEADLINE_EXCEEDED: ")
    assert "Traceback" not in err


def test_missing_dev_client_file_says_what_to_do(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOOLMESH_TOKEN", raising=False)
    code = main(["tools", "--target", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: UNAUTHENTICATED: no token: ") and "dev-client.json" in err


def test_base_port_derives_every_port_and_target() -> None:
    env = child_environment({"TOOLMESH_DATA_DIR": "/tmp/x"}, 6000)
    assert env["TOOLMESH_GATEWAY_PORT"] == "6000" and env["TOOLMESH_TELEMETRY_PORT"] == "6004"
    assert env["TOOLMESH_GATEWAY_ROUTER_TARGET"] == "127.0.0.1:6002"
    assert env["TOOLMESH_OTLP_ENDPOINT"] == "127.0.0.1:6004"
    assert address("memory", env) == "127.0.0.1:6003"
    assert address("auth", {}) == "127.0.0.1:50052"
    assert address("auth", {"TOOLMESH_HOST": "0.0.0.0", "TOOLMESH_AUTH_PORT": "7"}) == "127.0.0.1:7"


def test_without_a_base_port_callers_follow_the_ports_the_services_listen_on() -> None:
    """The MCP face called 50051 while `up` started the gateway elsewhere (never ready)."""
    env = child_environment({"TOOLMESH_GATEWAY_PORT": "6100", "TOOLMESH_MEMORY_PORT": "6103"}, 0)
    assert env["TOOLMESH_GATEWAY_TARGET"] == "127.0.0.1:6100"  # the face's gateway_target
    assert env["TOOLMESH_MEMORY_TARGET"] == "127.0.0.1:6103"
    assert env["TOOLMESH_TELEMETRY_TARGET"] == "127.0.0.1:50055"
    assert env["TOOLMESH_OTLP_ENDPOINT"] == "127.0.0.1:50055"
    # What the caller set stays as it is.
    told = {"TOOLMESH_GATEWAY_PORT": "6100", "TOOLMESH_GATEWAY_TARGET": "10.0.0.1:1"}
    assert child_environment(told, 0)["TOOLMESH_GATEWAY_TARGET"] == "10.0.0.1:1"
