"""The MCP face as a sixth real process in front of the five (mutual TLS to the gateway, HTTPS
to its clients), spoken to with the official `mcp` SDK client.

Tests that need the router side of bring-your-own tools (ResolveTool for CallTool, the backend
registry for mcp-server-time) skip at run time, naming what is missing, while the router does
not have it: remove nothing by hand, they start running once it does.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import mcp_types as types
import pytest

from testing.mesh import Mesh
from tests.e2e.conftest import bearer
from tests.faceproc import FaceProcess, mcp_session
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

pytestmark = pytest.mark.e2e

# The router's base servicer raises NotImplementedError for an RPC it lacks, which its error
# interceptor reports as INTERNAL; a server without the method at all says UNIMPLEMENTED.


@pytest.fixture(scope="module")
def face(mesh: Mesh) -> Iterator[FaceProcess]:
    certs = mesh.certs
    process = FaceProcess(
        mesh.gateway,
        mesh.data_dir / "logs" / "mcpface.log",
        env={
            "TOOLMESH_TLS_CA_FILE": str(certs / "ca.pem"),
            "TOOLMESH_MCPFACE_TLS_CERT_FILE": str(certs / "mcpface.pem"),
            "TOOLMESH_MCPFACE_TLS_KEY_FILE": str(certs / "mcpface.key"),
        },
        ca_file=certs / "ca.pem",
    )
    process.start()
    yield process
    assert process.stop() == 0


def _text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_the_face_lists_builtin_tools_and_refuses_a_missing_token(
    face: FaceProcess, token: str
) -> None:
    async with mcp_session(face.url, token, face.ca_file) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert {"calculator", "save_note"} <= set(tools)
    assert tools["calculator"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert tools["save_note"].annotations.read_only_hint is False  # type: ignore[union-attr]
    with pytest.raises(ExceptionGroup):
        async with mcp_session(face.url, None, face.ca_file):
            pass
    assert (await asyncio.to_thread(face.ready))[0] == 200


async def test_calls_run_through_the_mesh_with_audit(
    face: FaceProcess, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    async with mcp_session(face.url, token, face.ca_file) as session:
        read = await session.call_tool("calculator", {"expression": "17 * 23"})
        write = await session.call_tool(
            "save_note", {"text": "from MCP"}, meta={"toolmesh/idempotencyKey": "e2e-mcp-note"}
        )
    assert not read.is_error and "391" in _text(read)
    assert not write.is_error, _text(write)
    # Neither call named a session: the caller's default one keeps the note for a later
    # connection (the face is stateless).
    async with mcp_session(face.url, token, face.ca_file) as session:
        notes = await session.call_tool("list_notes", {})
    assert not notes.is_error and "from MCP" in _text(notes), _text(notes)
    request_id = (write.meta or {})["toolmesh/requestId"]
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        events = gateway.ListAudit(
            gateway_pb2.ListAuditRequest(action="tool.write"), metadata=bearer(token), timeout=10
        ).events
        if any(e.event.request_id == request_id for e in events):
            break
        assert asyncio.get_running_loop().time() < deadline, "no tool.write audit event"
        await asyncio.sleep(0.2)


def _time_server() -> list[str]:
    beside = Path(sys.executable).with_name("mcp-server-time")
    program = str(beside) if beside.exists() else shutil.which("mcp-server-time")
    if not program:
        pytest.skip("mcp-server-time is not installed")
    return [program, "--local-timezone", "UTC"]


async def test_mcp_server_time_behind_toolmesh_through_the_face(
    face: FaceProcess, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    backend = router_pb2.Backend(
        name="facetime", kind=router_pb2.BACKEND_KIND_MCP_STDIO, command=_time_server()
    )
    gateway.RegisterBackend(
        gateway_pb2.RegisterBackendRequest(backend=backend), metadata=bearer(token), timeout=30
    )
    try:
        tool = "facetime.get_current_time"
        deadline = asyncio.get_running_loop().time() + 60
        async with mcp_session(face.url, token, face.ca_file) as session:
            while True:
                listed = {t.name: t for t in (await session.list_tools()).tools}
                if tool in listed:
                    break
                assert asyncio.get_running_loop().time() < deadline, "never published"
                await asyncio.sleep(0.3)
            assert listed[tool].annotations.read_only_hint is True  # type: ignore[union-attr]
            result = await session.call_tool(tool, {"timezone": "Europe/Paris"})
        assert not result.is_error, _text(result)
        assert "Europe/Paris" in _text(result)
    finally:
        gateway.RemoveBackend(
            gateway_pb2.RemoveBackendRequest(name="facetime"), metadata=bearer(token), timeout=10
        )
