"""CallTool in `make bench`: a built-in tool and an MCP server behind toolmesh, each beside the
raw gRPC echo and beside the same MCP server called directly with the `mcp` SDK client.

Called from bench/run.py with a running mesh (gateway target and a token with every scope);
returns a Markdown section for BENCHMARKS.md. The MCP server is `mcp-server-time` (PyPI, stdio)
registered as a backend through Gateway.RegisterBackend; until the router supports backends
(it answers UNIMPLEMENTED) those rows say so instead of failing the run.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from grpc import aio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from bench.cpu import CpuWindow
from bench.echo_server import METHOD
from bench.load import Result, Window, closed_loop
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

BACKEND = "benchtime"
TIME_ARGS = {"timezone": "UTC"}


def time_server() -> list[str]:
    """The argv of mcp-server-time, from this interpreter's environment (no PATH lookup)."""
    beside = Path(sys.executable).with_name("mcp-server-time")
    program = str(beside) if beside.exists() else shutil.which("mcp-server-time")
    if not program:
        raise RuntimeError("mcp-server-time is not installed (pip install -e '.[dev]')")
    return [program, "--local-timezone", "UTC"]


async def _echo(target: str, concurrency: int, seconds: float) -> Result:
    async with aio.insecure_channel(target) as channel:
        echo = channel.unary_unary(METHOD)
        return await closed_loop(lambda _w: echo(b"17 * 23", timeout=5), concurrency, seconds)


async def _call_tool(
    stub: gateway_pb2_grpc.GatewayStub,
    token: str,
    tool: str,
    arguments: str,
    concurrency: int,
    seconds: float,
    window: Window | None = None,
) -> Result:
    metadata = (("authorization", f"Bearer {token}"),)
    request = gateway_pb2.CallToolRequest(tool=tool, arguments_json=arguments)

    async def call(_worker: int) -> object:
        reply = await stub.CallTool(request, metadata=metadata, timeout=10)
        if reply.outcome != gateway_pb2.OUTCOME_TOOL_ANSWERED:
            raise RuntimeError(f"{reply.outcome}: {reply.answer}")
        return reply

    return await closed_loop(call, concurrency, seconds, window=window)


async def _direct_mcp(concurrency: int, seconds: float) -> Result:
    """The same MCP server over stdio with the SDK client, one session, no toolmesh."""
    argv = time_server()
    params = StdioServerParameters(command=argv[0], args=argv[1:])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()

        async def call(_worker: int) -> object:
            result = await session.call_tool("get_current_time", TIME_ARGS)
            if result.is_error:
                raise RuntimeError("tool error")
            return result

        return await closed_loop(call, concurrency, seconds)


async def _register(stub: gateway_pb2_grpc.GatewayStub, token: str) -> str:
    """Register mcp-server-time and wait until its tools are published; the tool's name."""
    metadata = (("authorization", f"Bearer {token}"),)
    backend = router_pb2.Backend(
        name=BACKEND, kind=router_pb2.BACKEND_KIND_MCP_STDIO, command=time_server()
    )
    await stub.RegisterBackend(
        gateway_pb2.RegisterBackendRequest(backend=backend), metadata=metadata, timeout=30
    )
    tool = f"{BACKEND}.get_current_time"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        listed = await stub.ListTools(gateway_pb2.ListToolsRequest(), metadata=metadata, timeout=10)
        if any(t.name == tool for t in listed.tools):
            return tool
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{tool} was not published within 60 s")


def _ratio(a: float, b: float, text: str) -> str:
    return text.format(a / b) if a and b else "-"


def _row(name: str, result: Result, echo: Result, direct: Result | None) -> str:
    versus_direct = _ratio(result.p50_ms, direct.p50_ms, "{:.1f}x") if direct else "-"
    return (
        f"| {name} | {result.concurrency} | {result.requests} | {result.errors} "
        f"| {result.rps:,.0f} | {result.p50_ms:.2f} | {result.p95_ms:.2f} | {result.p99_ms:.2f} "
        f"| {_ratio(result.p50_ms, echo.p50_ms, '{:.1f}x')} "
        f"| {_ratio(result.rps, echo.rps, '{:.3f}')} | {versus_direct} |"
    )


async def bench(
    echo_target: str,
    gateway_target: str,
    token: str,
    levels: tuple[int, ...],
    seconds: float,
    progress: Callable[[str], None] = print,
    cpu_rows: list[tuple[str, int, CpuWindow]] | None = None,
    pids: dict[str, int] | None = None,
) -> str:
    """Measure every row at every concurrency level; the Markdown section."""
    rows: list[str] = []
    calculator = '{"expression": "17 * 23"}'
    async with aio.insecure_channel(gateway_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        tool = await _register(stub, token)
        try:
            for concurrency in levels:
                echo = await _echo(echo_target, concurrency, seconds)
                direct = await _direct_mcp(concurrency, seconds)
                rows += [
                    _row("echo", echo, echo, None),
                    _row("mcp-server-time direct (mcp SDK, stdio)", direct, echo, direct),
                ]
                window = CpuWindow(pids) if pids else None
                builtin = await _call_tool(
                    stub, token, "calculator", calculator, concurrency, seconds, window
                )
                if window is not None and cpu_rows is not None:
                    cpu_rows.append(
                        (f"CallTool calculator, {concurrency} callers", builtin.requests, window)
                    )
                rows.append(_row("CallTool calculator (built-in)", builtin, echo, None))
                progress(
                    f"c={concurrency}: echo p50 {echo.p50_ms:.2f} ms; CallTool calculator "
                    f"{builtin.rps:,.0f}/s p50 {builtin.p50_ms:.2f} ms"
                )
                via = await _call_tool(
                    stub, token, tool, '{"timezone": "UTC"}', concurrency, seconds
                )
                rows.append(_row(f"CallTool {tool} (stdio backend)", via, echo, direct))
                progress(
                    f"c={concurrency}: direct MCP p50 {direct.p50_ms:.2f} ms; CallTool {tool} "
                    f"{via.rps:,.0f}/s p50 {via.p50_ms:.2f} ms"
                )
        finally:
            await _remove(stub, token)
    return "\n".join(
        [
            "## CallTool: a built-in tool and an MCP server behind toolmesh",
            "",
            "`CallTool calculator` is `Gateway.CallTool` on a built-in tool through the governed "
            "pipeline (JWT, allowlist, scope, budget check, router invoke, usage and audit to the "
            "outbox); no session, so no memory write. `mcp-server-time direct` calls the MCP "
            "server `mcp-server-time` (PyPI) over stdio with the official `mcp` SDK client, one "
            "session, no toolmesh; `CallTool benchtime.get_current_time` is the same server "
            "registered as a stdio backend and called through the gateway and router. Measured "
            "in the same run as the echo rows beside them; p50 vs direct MCP is what toolmesh's "
            "controls add to calling the MCP server yourself.",
            "",
            "| call | concurrency | requests | failed | req/s | p50 ms | p95 ms | p99 ms "
            "| p50 vs echo | rps vs echo | p50 vs direct MCP |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


async def _remove(stub: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    await stub.RemoveBackend(
        gateway_pb2.RemoveBackendRequest(name=BACKEND), metadata=metadata, timeout=10
    )
