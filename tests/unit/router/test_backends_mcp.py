"""Real MCP servers this project did not write, behind a real router (in-process, port 0):
mcp-server-time and mcp-server-git over stdio, @modelcontextprotocol/server-everything over
streamable HTTP with a bearer token read from a file. One router and one set of servers for the
module (each stdio server takes about 1.5 s to start)."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.unit.router.backend_helpers import (
    ADMIN,
    BIN,
    OTHER,
    everything_server,
    free_port,
    http_backend,
    invoke,
    register,
    stdio_backend,
)
from tests.unit.router.harness import RouterServer, router_settings, start_router
from tests.unit.router.test_router_grpc import field_violations
from toolmesh.router.v1 import router_pb2

TOKEN = "tm-secret-7f3a9c1e5b2d8f4a6c0e"


@dataclass
class Mesh:
    router: RouterServer
    repo: Path
    registered: dict[str, router_pb2.Backend]


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    root = tmp_path_factory.mktemp("backends")
    repo = root / "repo"
    repo.mkdir()
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "README").write_text("hello\n")
    subprocess.run(["git", "add", "README"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "first"], cwd=repo, check=True)
    token_file = root / "everything.token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    with everything_server(port):
        async for router in start_router(router_settings(root / "data")):
            registered = {
                "time": await register(
                    router.stub,
                    stdio_backend(
                        "time", [str(BIN / "mcp-server-time"), "--local-timezone", "UTC"]
                    ),
                ),
                "git": await register(
                    router.stub,
                    stdio_backend(
                        "git",
                        [str(BIN / "mcp-server-git"), "--repository", str(repo)],
                        side_effects={"git_log": "write"},
                        cost_units=3,
                    ),
                ),
                "everything": await register(
                    router.stub,
                    http_backend(
                        "everything",
                        f"http://127.0.0.1:{port}/mcp",
                        bearer_file=str(token_file),
                    ),
                ),
            }
            yield Mesh(router, repo, registered)


def tool_named(backend: router_pb2.Backend, name: str) -> router_pb2.ToolContract:
    return next(t for t in backend.tools if t.name == name)


async def test_registration_connects_and_publishes_every_tool_as_1_0_0(mesh: Mesh) -> None:
    time_backend = mesh.registered["time"]
    assert time_backend.state == router_pb2.BACKEND_STATE_READY, time_backend.last_error
    assert time_backend.tenant == "acme" and time_backend.created_by == "admin-1"
    assert time_backend.last_discovery_at.seconds > 0
    tool = tool_named(time_backend, "time.get_current_time")
    assert tool.version == "1.0.0"
    assert tool.backend == "time" and tool.backend_kind == router_pb2.BACKEND_KIND_MCP_STDIO
    assert tool.side_effect == router_pb2.SIDE_EFFECT_READ_ONLY
    assert len(tool.fingerprint) == 64
    assert "timezone" in json.loads(tool.input_schema_json)["properties"]
    everything = mesh.registered["everything"]
    assert everything.state == router_pb2.BACKEND_STATE_READY, everything.last_error
    assert everything.bearer_file.endswith("everything.token")
    assert {"everything.echo", "everything.get-sum"} <= {t.name for t in everything.tools}


async def test_time_over_stdio_answers_and_declines_a_bad_zone(mesh: Mesh) -> None:
    reply = await invoke(mesh.router.stub, "time.get_current_time", {"timezone": "Europe/Paris"})
    assert not reply.tool_error
    assert json.loads(reply.result_json)["timezone"] == "Europe/Paris"
    assert "Europe/Paris" in reply.answer
    assert reply.tool_version == "1.0.0"

    declined = await invoke(mesh.router.stub, "time.get_current_time", {"timezone": "Mars/Olympus"})
    assert declined.tool_error
    assert "Invalid timezone" in declined.answer
    assert declined.result_json == ""

    span = next(
        s
        for s in reversed(mesh.router.spans.get_finished_spans())
        if s.name == "execute_tool time.get_current_time"
    )
    assert span.attributes is not None
    assert span.attributes["toolmesh.backend.kind"] == "mcp_stdio"
    assert span.attributes["toolmesh.tool.version"] == "1.0.0"
    assert span.attributes["toolmesh.tool.error"] is True


async def test_arguments_are_checked_against_the_published_schema_first(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await invoke(mesh.router.stub, "time.get_current_time", {"timezone": 5})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "arguments_json.timezone" in field_violations(caught.value)


async def test_git_read_tool_runs_and_write_tools_need_an_idempotency_key(mesh: Mesh) -> None:
    git = mesh.registered["git"]
    sides = {t.name: t.side_effect for t in git.tools}
    assert sides["git.git_status"] == router_pb2.SIDE_EFFECT_READ_ONLY
    assert sides["git.git_add"] == router_pb2.SIDE_EFFECT_WRITE
    assert sides["git.git_commit"] == router_pb2.SIDE_EFFECT_WRITE
    # The operator's classification wins over the server's readOnlyHint.
    assert sides["git.git_log"] == router_pb2.SIDE_EFFECT_WRITE
    assert tool_named(git, "git.git_status").cost_units == 3

    status = await invoke(mesh.router.stub, "git.git_status", {"repo_path": str(mesh.repo)})
    assert "On branch main" in status.answer and status.cost_units == 3

    (mesh.repo / "new.txt").write_text("new\n")
    add = {"repo_path": str(mesh.repo), "files": ["new.txt"]}
    with pytest.raises(aio.AioRpcError) as caught:
        await invoke(mesh.router.stub, "git.git_add", add)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in field_violations(caught.value)
    added = await invoke(mesh.router.stub, "git.git_add", add, idempotency_key="add-1")
    assert not added.tool_error, added.answer
    staged = subprocess.run(
        ["git", "diff", "--cached", "--name-only"],
        cwd=mesh.repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert staged.stdout.split() == ["new.txt"]


async def test_http_backend_echo_sum_structured_result_and_image(mesh: Mesh) -> None:
    stub = mesh.router.stub
    echo = await invoke(stub, "everything.echo", {"message": "hello toolmesh"})
    assert echo.answer == "Echo: hello toolmesh"
    total = await invoke(stub, "everything.get-sum", {"a": 2, "b": 40})
    assert "42" in total.answer
    weather = await invoke(stub, "everything.get-structured-content", {"location": "Chicago"})
    assert json.loads(weather.result_json)["conditions"]
    image = await invoke(stub, "everything.get-tiny-image", {})
    # Media is summarized, never inlined as base64.
    assert "[image image/png" in image.answer
    assert "iVBOR" not in image.answer and len(image.answer) < 2000


async def test_a_tenant_sees_only_its_own_backends(mesh: Mesh) -> None:
    stub = mesh.router.stub
    mine = await stub.ListTools(router_pb2.ListToolsRequest(caller=ADMIN), timeout=5)
    assert "time.get_current_time" in {t.name for t in mine.tools}
    theirs = await stub.ListTools(router_pb2.ListToolsRequest(caller=OTHER), timeout=5)
    names = {t.name for t in theirs.tools}
    assert "calculator" in names and not any("." in n for n in names)
    listed = await stub.ListBackends(router_pb2.ListBackendsRequest(caller=OTHER), timeout=5)
    assert list(listed.backends) == []
    for call in (
        stub.ResolveTool(
            router_pb2.ResolveToolRequest(
                caller=OTHER, tool_name="time.get_current_time", allowed_tools=["*"]
            ),
            timeout=5,
        ),
        invoke(stub, "time.get_current_time", {}, caller=OTHER),
        stub.RemoveBackend(router_pb2.RemoveBackendRequest(caller=OTHER, name="time"), timeout=5),
        stub.ListToolVersions(
            router_pb2.ListToolVersionsRequest(caller=OTHER, tool_name="time.get_current_time"),
            timeout=5,
        ),
    ):
        with pytest.raises(aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    unknown = await _code(
        stub.RemoveBackend(router_pb2.RemoveBackendRequest(caller=ADMIN, name="nope"), timeout=5)
    )
    assert unknown == grpc.StatusCode.NOT_FOUND


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_resolve_tool_gives_the_latest_or_the_exact_version_if_allowed(mesh: Mesh) -> None:
    stub = mesh.router.stub
    latest = await stub.ResolveTool(
        router_pb2.ResolveToolRequest(
            caller=ADMIN, tool_name="time.get_current_time", allowed_tools=["time.*"]
        ),
        timeout=5,
    )
    assert latest.tool.version == "1.0.0" and latest.tool.backend == "time"
    builtin = await stub.ResolveTool(
        router_pb2.ResolveToolRequest(caller=ADMIN, tool_name="calculator", allowed_tools=["*"]),
        timeout=5,
    )
    assert builtin.tool.version == "1.1.0"
    assert builtin.tool.backend_kind == router_pb2.BACKEND_KIND_BUILTIN
    for request in (
        router_pb2.ResolveToolRequest(
            caller=ADMIN, tool_name="time.get_current_time", allowed_tools=["git.*"]
        ),
        router_pb2.ResolveToolRequest(
            caller=ADMIN,
            tool_name="time.get_current_time",
            tool_version="2.0.0",
            allowed_tools=["*"],
        ),
    ):
        assert await _code(stub.ResolveTool(request, timeout=5)) == grpc.StatusCode.NOT_FOUND


async def test_bad_registrations_name_the_field(mesh: Mesh, tmp_path: Path) -> None:
    stub = mesh.router.stub
    cases = {
        "backend.name": stdio_backend("Bad Name", ["mcp-server-time"]),
        "backend.command": stdio_backend("empty", []),
        "backend.command[0]": stdio_backend("nowhere", ["no-such-program-xyz"]),
        "backend.url": http_backend("meta", "http://169.254.169.254/latest/meta-data"),
        "backend.kind": router_pb2.Backend(name="k"),
        "backend.side_effects[git_add]": stdio_backend(
            "se", ["mcp-server-time"], side_effects={"git_add": "maybe"}
        ),
        "backend.timeout_ms": stdio_backend("t", ["mcp-server-time"], timeout_ms=5),
        "backend.bearer_env": http_backend(
            "env", "http://127.0.0.1:1/mcp", bearer_env="TOOLMESH_ROUTER_DATABASE_URL"
        ),
        "backend.target": router_pb2.Backend(
            name="g", kind=router_pb2.BACKEND_KIND_GRPC, target="10.1.2.3:50070"
        ),
    }
    for field, backend in cases.items():
        with pytest.raises(aio.AioRpcError) as caught:
            await register(stub, backend)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(caught.value), (field, caught.value.details())
    for url in ("http://user:pw@127.0.0.1:1/mcp", "ftp://127.0.0.1/mcp", "http://[fe80::1]:80/"):
        with pytest.raises(aio.AioRpcError) as caught:
            await register(stub, http_backend("u", url))
        assert "backend.url" in field_violations(caught.value)
    with pytest.raises(aio.AioRpcError) as caught:
        await register(stub, stdio_backend("time", ["mcp-server-time"]))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(aio.AioRpcError) as caught:
        await register(stub, stdio_backend("shared", ["mcp-server-time"]), shared=True)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_no_secret_in_logs_spans_or_answers(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mesh.router.spans.clear()
    stub = mesh.router.stub
    await invoke(stub, "everything.echo", {"message": "who am i"})
    await invoke(stub, "everything.get-env", {})  # the server's environment, as it sees it
    listed = await stub.ListBackends(router_pb2.ListBackendsRequest(caller=ADMIN), timeout=5)
    assert TOKEN not in str(listed)
    assert TOKEN not in caplog.text
    for span in mesh.router.spans.get_finished_spans():
        assert TOKEN not in json.dumps(dict(span.attributes or {}), default=str)
        assert TOKEN not in span.name
