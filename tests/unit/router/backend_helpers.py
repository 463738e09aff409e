"""Helpers for the backend tests: real MCP servers in subprocesses, callers, child processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
EVERYTHING = REPO / "node_modules" / ".bin" / "mcp-server-everything"
ADMIN = common_pb2.Caller(
    subject="admin-1", tenant="acme", scopes=["admin", "tools:read", "tools:write"]
)
OTHER = common_pb2.Caller(subject="admin-2", tenant="globex", scopes=["admin", "tools:read"])
PLATFORM = common_pb2.Caller(
    subject="root", tenant="ops", scopes=["admin", "platform:admin", "tools:read"]
)
SCRIPTS = Path(__file__).with_name("mcp_servers")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@contextmanager
def process(
    argv: list[str], *, port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process listening on ``port``; killed afterwards."""
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def everything_server(port: int) -> Any:
    """@modelcontextprotocol/server-everything over streamable HTTP on ``port`` (/mcp)."""
    return process([str(EVERYTHING), "streamableHttp"], port=port, env={"PORT": str(port)})


def stdio_backend(name: str, command: list[str], **fields: Any) -> router_pb2.Backend:
    return router_pb2.Backend(
        name=name, kind=router_pb2.BACKEND_KIND_MCP_STDIO, command=command, **fields
    )


def http_backend(name: str, url: str, **fields: Any) -> router_pb2.Backend:
    return router_pb2.Backend(name=name, kind=router_pb2.BACKEND_KIND_MCP_HTTP, url=url, **fields)


async def register(
    stub: router_pb2_grpc.RouterStub,
    backend: router_pb2.Backend,
    *,
    caller: common_pb2.Caller = ADMIN,
    shared: bool = False,
    timeout: float = 20,
) -> router_pb2.Backend:
    reply = await stub.RegisterBackend(
        router_pb2.RegisterBackendRequest(caller=caller, backend=backend, shared=shared),
        timeout=timeout,
    )
    return reply.backend


async def invoke(
    stub: router_pb2_grpc.RouterStub,
    tool: str,
    arguments: dict[str, Any],
    *,
    version: str = "1.0.0",
    caller: common_pb2.Caller = ADMIN,
    timeout: float = 10,
    **fields: Any,
) -> router_pb2.InvokeToolResponse:
    return await stub.InvokeTool(
        router_pb2.InvokeToolRequest(
            caller=caller,
            request_id="req-backend",
            tool_name=tool,
            tool_version=version,
            arguments_json=json.dumps(arguments),
            allowed_tools=["*"],
            **fields,
        ),
        timeout=timeout,
    )


def children(marker: str) -> list[int]:
    """Processes of this test run whose command line contains ``marker`` (MCP servers the
    in-process router started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


async def eventually(check: Any, timeout_s: float = 15.0, interval_s: float = 0.1) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)
