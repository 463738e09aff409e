"""Gateway.Run through the five real processes."""

from __future__ import annotations

import re
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from testing.mesh import Mesh
from tests.e2e.conftest import bearer
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.e2e


def _session() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def test_calculator_answer_carries_tool_confidence_and_ids(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    reply = gateway.Run(
        gateway_pb2.RunRequest(session_id=_session(), prompt="what is 17 * 23"),
        metadata=bearer(token),
        timeout=10,
    )
    assert "391" in reply.answer
    assert reply.tool_name == "calculator"
    assert re.fullmatch(r"\d+\.\d+\.\d+", reply.tool_version)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert reply.confidence >= 0.5
    parts = reply.confidence_parts
    assert 0 < parts.intent <= 1 and 0 < parts.schema_fit <= 1 and 0 < parts.health <= 1
    assert re.fullmatch(r"[0-9a-f]{32}", reply.trace_id)
    assert reply.request_id
    assert reply.usage.tool_calls == 1
    # The rules routed it; no model is configured in this mesh: no tokens used.
    assert (reply.usage.tokens_in, reply.usage.tokens_out, reply.usage.model) == (0, 0, "")
    assert list(reply.degraded) == []


def test_prompt_no_tool_is_confident_about_runs_nothing(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    reply = gateway.Run(
        gateway_pb2.RunRequest(session_id=_session(), prompt="sing me a song about the sea"),
        metadata=bearer(token),
        timeout=10,
    )
    assert reply.outcome == gateway_pb2.OUTCOME_NO_MATCH
    assert reply.tool_name == ""
    assert reply.usage.tool_calls == 0


def test_write_tool_needs_tools_write_scope(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    read_only = mesh.token(scopes=("tools:read",))
    with pytest.raises(grpc.RpcError) as err:
        gateway.Run(
            gateway_pb2.RunRequest(session_id=_session(), prompt="save a note: order more coffee"),
            metadata=bearer(read_only),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tools:write" in (err.value.details() or "")


def test_write_tool_runs_with_tools_write(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    reply = gateway.Run(
        gateway_pb2.RunRequest(session_id=_session(), prompt="save a note: order more coffee"),
        metadata=bearer(token),
        timeout=10,
    )
    assert reply.tool_name == "save_note"
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert "order more coffee" in reply.result_json


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-jwt"),), (("authorization", "Basic abc"),)],
    ids=["missing", "garbage", "wrong-scheme"],
)
def test_missing_or_invalid_token_is_unauthenticated(
    gateway: gateway_pb2_grpc.GatewayStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        gateway.Run(
            gateway_pb2.RunRequest(session_id=_session(), prompt="what is 1 + 1"),
            metadata=metadata,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("request_fields", "bad_field"),
    [
        ({"session_id": "ok", "prompt": ""}, "prompt"),
        ({"session_id": "ok", "prompt": "   "}, "prompt"),
        ({"session_id": "ok", "prompt": "x" * 4001}, "prompt"),
        ({"session_id": "ok", "prompt": "bell \x07"}, "prompt"),
        ({"session_id": "", "prompt": "what is 1 + 1"}, "session_id"),
        ({"session_id": "no spaces allowed", "prompt": "what is 1 + 1"}, "session_id"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    gateway: gateway_pb2_grpc.GatewayStub,
    token: str,
    request_fields: dict[str, str],
    bad_field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        gateway.Run(gateway_pb2.RunRequest(**request_fields), metadata=bearer(token), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field in (err.value.details() or "")
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields.extend(v.field for v in bad_request.field_violations)
    assert bad_field in fields


def test_turns_are_remembered_in_order(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    session = _session()
    for prompt in ("what is 2 + 2", "what is 3 * 3"):
        gateway.Run(
            gateway_pb2.RunRequest(session_id=session, prompt=prompt),
            metadata=bearer(token),
            timeout=10,
        )
    history = gateway.GetHistory(
        gateway_pb2.GetHistoryRequest(session_id=session), metadata=bearer(token), timeout=10
    )
    contents = [turn.content for turn in history.turns]
    assert contents[0] == "what is 2 + 2" and "4" in contents[1]
    assert contents[2] == "what is 3 * 3" and "9" in contents[3]
    seqs = [turn.seq for turn in history.turns]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


def test_same_idempotency_key_never_writes_twice(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    session = _session()
    request = gateway_pb2.RunRequest(
        session_id=session, prompt="what is 5 + 5", idempotency_key="retry-1"
    )
    first = gateway.Run(request, metadata=bearer(token), timeout=10)
    second = gateway.Run(request, metadata=bearer(token), timeout=10)
    assert first.request_id == second.request_id
    history = gateway.GetHistory(
        gateway_pb2.GetHistoryRequest(session_id=session), metadata=bearer(token), timeout=10
    )
    assert len(history.turns) == 2


def test_list_tools_shows_contracts(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    tools = gateway.ListTools(gateway_pb2.ListToolsRequest(), metadata=bearer(token), timeout=10)
    by_name = {tool.name: tool for tool in tools.tools}
    assert {"calculator", "unit_convert", "current_time", "save_note"} <= set(by_name)
    assert by_name["save_note"].side_effect == "write"
    assert by_name["calculator"].side_effect == "read_only"
    assert by_name["calculator"].input_schema_json.startswith("{")
