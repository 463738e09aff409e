"""MCP backends: stdio and streamable HTTP sessions through the official ``mcp`` SDK's
ClientSession (services.router.backends.clients says what a session and a connector are).

Imported only when an MCP backend is connected: the SDK and its types are about 20 MB of a
process's memory and a fifth of a second of start-up that a router without MCP backends does
not pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx2
import mcp_types
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from services.kit.audit import clean
from services.router.backends.clients import (
    MAX_PAGES,
    META_IDEMPOTENCY_KEY,
    META_REQUEST_ID,
    BackendFault,
    CallOutcome,
    RateLimitedLines,
    RawTool,
    Session,
    log,
    read_bearer,
)
from services.router.backends.config import BackendConfig
from services.router.backends.contracts import human_size
from services.router.backends.network import CheckedTransport, HostPolicy


def describe_content(blocks: list[mcp_types.ContentBlock]) -> str:
    """MCP content as the answer text: text as it is, media and resources summarized (a tool
    answer is never megabytes of base64)."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            kind = "image" if isinstance(block, mcp_types.ImageContent) else "audio"
            size = len(block.data) * 3 // 4
            parts.append(f"[{kind} {clean(block.mime_type, 64)} {human_size(size)}]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource {clean(str(block.uri), 512)}]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, mcp_types.TextResourceContents):
                parts.append(f"[resource {clean(str(resource.uri), 512)}]\n{resource.text}")
            else:
                size = len(resource.blob) * 3 // 4
                parts.append(f"[resource {clean(str(resource.uri), 512)} {human_size(size)}]")
        else:
            parts.append("[unsupported content]")
    return "\n".join(parts)


def _mcp_fault(label: str, error: BaseException) -> BackendFault:
    """An exception from the MCP SDK as a BackendFault (the backend's own text is logged,
    clipped, never returned)."""
    if isinstance(error, MCPError):
        if error.code == mcp_types.CONNECTION_CLOSED:
            return BackendFault(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {label} closed the connection; reconnecting",
                broken=True,
            )
        if error.code == mcp_types.REQUEST_TIMEOUT:
            return BackendFault(grpc.StatusCode.DEADLINE_EXCEEDED, f"backend {label} timed out")
        log.warning(
            "backend answered with a protocol error",
            extra={"backend": label, "code": error.code, "reason": clean(error.message, 300)},
        )
        return BackendFault(
            grpc.StatusCode.INTERNAL,
            f"backend {label} answered with MCP error {error.code}",
        )
    if isinstance(error, RuntimeError) and "structured content" in str(error):
        return BackendFault(
            grpc.StatusCode.INTERNAL,
            f"backend {label} returned a result outside its contract",
            contract=True,
        )
    if isinstance(error, ValidationError):
        return BackendFault(grpc.StatusCode.INTERNAL, f"backend {label} sent a malformed message")
    log.warning(
        "backend connection failed",
        extra={"backend": label, "error": type(error).__name__, "reason": clean(str(error), 300)},
    )
    return BackendFault(
        grpc.StatusCode.UNAVAILABLE, f"backend {label} is unreachable; reconnecting", broken=True
    )


class McpSession:
    def __init__(self, session: ClientSession, label: str) -> None:
        self._session = session
        self._label = label

    async def list_tools(self) -> list[RawTool]:
        found: list[mcp_types.Tool] = []
        cursor: str | None = None
        try:
            for _ in range(MAX_PAGES):
                params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
                page = await self._session.list_tools(params=params)
                found.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
        except Exception as error:
            raise _mcp_fault(self._label, error) from None
        tools = []
        for tool in found:
            annotations = (
                tool.annotations.model_dump(by_alias=True, exclude_none=True)
                if tool.annotations is not None
                else {}
            )
            tools.append(
                RawTool(
                    name=tool.name,
                    title=tool.title or "",
                    description=tool.description or "",
                    input_schema=tool.input_schema,
                    output_schema=tool.output_schema,
                    read_only_hint=(
                        tool.annotations.read_only_hint if tool.annotations is not None else None
                    ),
                    annotations=annotations,
                )
            )
        return tools

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        idempotency_key: str,
        tenant: str,
        request_id: str,
    ) -> CallOutcome:
        meta = mcp_types.RequestParamsMeta()
        meta[META_REQUEST_ID] = request_id  # type: ignore[literal-required]
        if idempotency_key:
            meta[META_IDEMPOTENCY_KEY] = idempotency_key  # type: ignore[literal-required]
        try:
            result = await self._session.call_tool(name, arguments, meta=meta)
        except Exception as error:
            raise _mcp_fault(self._label, error) from None
        if not isinstance(result, mcp_types.CallToolResult):
            raise BackendFault(
                grpc.StatusCode.INTERNAL,
                f"backend {self._label} asked for input toolmesh cannot give",
            )
        structured = result.structured_content
        if structured is not None and not isinstance(structured, dict):
            structured = {"result": structured}
        return CallOutcome(
            answer=describe_content(list(result.content)),
            result=None if result.is_error else structured,
            is_error=result.is_error,
        )


@contextlib.asynccontextmanager
async def _mcp_session(streams: tuple[Any, Any], label: str) -> AsyncIterator[McpSession]:
    read, write = streams
    async with ClientSession(read, write) as session:
        try:
            await session.initialize()
        except Exception as error:
            raise _mcp_fault(label, error) from None
        yield McpSession(session, label)


class StdioConnector:
    """Starts the MCP server (explicit argv, no shell, the SDK's minimal environment) and copies
    its stderr to the log, rate-limited; the end of stderr means the process exited."""

    def __init__(
        self, config: BackendConfig, label: str, executable: str, lines_per_s: float
    ) -> None:
        self._params = StdioServerParameters(command=executable, args=list(config.command[1:]))
        self._label = label
        self._lines_per_s = lines_per_s
        self.died = asyncio.Event()
        self.dropped_lines = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Session]:
        self.died.clear()
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w")
        reader: asyncio.Task[None] | None = None
        try:
            async with stdio_client(self._params, errlog=errlog) as streams:
                # The child has its own copy; ours must go so that EOF means the child exited.
                errlog.close()
                reader = asyncio.create_task(self._copy_stderr(read_fd), name="backend-stderr")
                read_fd = -1
                async with _mcp_session(streams, self._label) as session:
                    yield session
        except OSError as error:
            raise BackendFault(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {self._label} could not be started ({error.strerror or 'OS error'})",
            ) from None
        finally:
            if not errlog.closed:
                errlog.close()
            if read_fd >= 0:
                os.close(read_fd)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _copy_stderr(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=64 * 1024)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), pipe
        )
        lines = RateLimitedLines(self._label, self._lines_per_s)
        try:
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # a line over the limit: take what there is
                    raw = await stream.read(64 * 1024)
                if not raw:
                    break
                if not lines.offer(raw.decode("utf-8", "replace").rstrip("\n")):
                    self.dropped_lines += 1
            self.died.set()
        finally:
            transport.close()


class HttpConnector:
    """Streamable HTTP through ``CheckedTransport`` (every connection's address re-checked
    against the host policy); the bearer token is read at each connection."""

    def __init__(self, config: BackendConfig, label: str, policy: HostPolicy) -> None:
        self._config = config
        self._label = label
        self._policy = policy
        self.died = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Session]:
        headers = {}
        token = read_bearer(self._config)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        del token
        client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(10.0, read=300.0),
            transport=CheckedTransport(self._policy),
            trust_env=False,
        )
        async with (
            client,
            streamable_http_client(self._config.url, http_client=client) as streams,
            _mcp_session(streams, self._label) as session,
        ):
            yield session
