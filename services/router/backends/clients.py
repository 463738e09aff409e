"""Sessions with backends: MCP over stdio and streamable HTTP (the official ``mcp`` SDK's
ClientSession), and gRPC ``toolmesh.tool.v1.ToolService``.

A ``Connector`` opens a ``Session`` as an async context manager, which the backend's supervisor
task holds open (anyio task groups must be entered and left by one task); calls from gRPC
handlers use the open session concurrently. Every failure becomes a ``BackendFault``: a gRPC
status, a message safe to show (no secrets, no backend output beyond a short code), and whether
the connection is gone (then the supervisor reconnects at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
import httpx2
import mcp_types
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from services.kit.audit import clean
from services.kit.channels import open_channel
from services.router.backends.config import BackendConfig, Kind
from services.router.backends.contracts import human_size
from services.router.backends.network import CheckedTransport, HostPolicy, HostRefused
from toolmesh.tool.v1 import tool_pb2, tool_pb2_grpc

log = logging.getLogger("toolmesh.router.backends")
stderr_log = logging.getLogger("toolmesh.router.backends.stderr")

# The idempotency key and request id travel in the MCP request's _meta under these keys.
META_IDEMPOTENCY_KEY = "io.toolmesh/idempotency-key"
META_REQUEST_ID = "io.toolmesh/request-id"
# tools/list pages read at most per discovery (a server that pages forever is cut off).
MAX_PAGES = 50
# Bearer tokens longer than this are refused (a file that is not a token).
MAX_TOKEN_BYTES = 8192
# A stderr line is clipped to this many characters in the log.
MAX_STDERR_LINE = 1000


@dataclass(frozen=True)
class RawTool:
    """A tool as the backend listed it, before toolmesh classifies it."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any] | None
    read_only_hint: bool | None
    title: str = ""
    annotations: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallOutcome:
    answer: str
    # The structured result (MCP structuredContent, ToolService result_json), if any.
    result: dict[str, Any] | None
    # The tool declined or failed for this input (MCP isError, ToolService is_error).
    is_error: bool


class BackendFault(Exception):
    """A backend failure as the status to answer with and a message safe to show."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        broken: bool = False,
        tool_fault: bool = True,
        contract: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The connection is gone: reconnect (restart a stdio server) now.
        self.broken = broken
        # False when the caller erred (the backend refused its arguments).
        self.tool_fault = tool_fault
        # The backend broke its own contract (a result outside its output schema).
        self.contract = contract


class Session(Protocol):
    async def list_tools(self) -> list[RawTool]: ...

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        idempotency_key: str,
        tenant: str,
        request_id: str,
    ) -> CallOutcome: ...


class Connector(Protocol):
    """Opens sessions with one backend; ``died`` is set when its process is seen to exit."""

    died: asyncio.Event

    def open(self) -> contextlib.AbstractAsyncContextManager[Session]: ...


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


class RateLimitedLines:
    """Copies a stream's lines to the log, at most ``per_s`` a second; counts the rest."""

    def __init__(self, label: str, per_s: float, clock: Any = time.monotonic) -> None:
        self._label = label
        self._per_s = per_s
        self._tokens = per_s
        self._clock = clock
        self._last = clock()
        self.dropped = 0

    def offer(self, line: str) -> bool:
        now = self._clock()
        self._tokens = min(self._per_s, self._tokens + (now - self._last) * self._per_s)
        self._last = now
        if self._tokens < 1:
            self.dropped += 1
            return False
        self._tokens -= 1
        extra: dict[str, Any] = {"backend": self._label, "line": clean(line, MAX_STDERR_LINE)}
        if self.dropped:
            extra["dropped_lines"] = self.dropped
            self.dropped = 0
        stderr_log.info("backend stderr", extra=extra)
        return True


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


def read_bearer(config: BackendConfig) -> str:
    """The bearer token, read now (never cached, never logged); '' when none is configured."""
    if config.bearer_file:
        try:
            with open(config.bearer_file, "rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError:
            raise BackendFault(
                grpc.StatusCode.UNAVAILABLE, f"backend {config.name}: bearer_file cannot be read"
            ) from None
        token = raw.decode("utf-8", "replace").strip()
    elif config.bearer_env:
        token = os.environ.get(config.bearer_env, "").strip()
    else:
        return ""
    if not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise BackendFault(
            grpc.StatusCode.UNAVAILABLE,
            f"backend {config.name}: the bearer token is missing or malformed",
        )
    return token


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


def target_hosts(target: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of a gRPC target: host:port, a comma list, ipv4:..., dns:///."""
    body = target
    if body.startswith("dns:///"):
        body = body[len("dns:///") :]
    elif body.startswith("ipv4:") or body.startswith("ipv6:"):
        body = body[len("ipv4:") :]
    pairs = []
    for part in body.split(","):
        parsed = urlsplit(f"//{part.strip()}")
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"{part.strip()!r} is not host:port")
        pairs.append((parsed.hostname, parsed.port))
    return pairs


class GrpcSession:
    def __init__(self, channel: aio.Channel, label: str) -> None:
        self._stub = tool_pb2_grpc.ToolServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._label = label

    def _fault(self, error: aio.AioRpcError) -> BackendFault:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return BackendFault(
                grpc.StatusCode.UNAVAILABLE, f"backend {self._label} is unavailable", broken=True
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return BackendFault(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"backend {self._label} timed out"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BackendFault(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"backend {self._label} refused the arguments: {clean(error.details() or '', 200)}",
                tool_fault=False,
            )
        log.warning(
            "tool service failed",
            extra={
                "backend": self._label,
                "code": code.name,
                "reason": clean(error.details() or "", 300),
            },
        )
        return BackendFault(grpc.StatusCode.INTERNAL, f"backend {self._label} failed ({code.name})")

    async def check_health(self) -> None:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except aio.AioRpcError as error:
            raise self._fault(error) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise BackendFault(
                grpc.StatusCode.UNAVAILABLE, f"backend {self._label} is not serving", broken=True
            )

    async def list_tools(self) -> list[RawTool]:
        await self.check_health()
        try:
            reply = await self._stub.ListTools(tool_pb2.ListToolsRequest(), timeout=10)
        except aio.AioRpcError as error:
            raise self._fault(error) from None
        tools = []
        for definition in reply.tools:
            try:
                input_schema = json.loads(definition.input_schema_json or "{}")
                output_schema = (
                    json.loads(definition.output_schema_json)
                    if definition.output_schema_json
                    else None
                )
            except ValueError:
                log.warning(
                    "tool service listed a tool with a schema that is not JSON; skipped",
                    extra={"backend": self._label, "tool": clean(definition.name, 64)},
                )
                continue
            tools.append(
                RawTool(
                    name=definition.name,
                    description=definition.description,
                    input_schema=input_schema,
                    output_schema=output_schema,
                    read_only_hint=definition.read_only,
                    annotations={"readOnlyHint": definition.read_only},
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
        request = tool_pb2.CallToolRequest(
            name=name,
            arguments_json=json.dumps(arguments),
            idempotency_key=idempotency_key,
            tenant=tenant,
            request_id=request_id,
        )
        try:
            # The caller's deadline is applied around this call (asyncio cancellation);
            # a generous gRPC deadline bounds it even if that were lost.
            reply = await self._stub.CallTool(request, timeout=300)
        except aio.AioRpcError as error:
            raise self._fault(error) from None
        result: dict[str, Any] | None = None
        if reply.result_json and not reply.is_error:
            try:
                parsed = json.loads(reply.result_json)
            except ValueError:
                raise BackendFault(
                    grpc.StatusCode.INTERNAL,
                    f"backend {self._label} returned a result outside its contract",
                    contract=True,
                ) from None
            result = parsed if isinstance(parsed, dict) else {"result": parsed}
        return CallOutcome(answer=reply.text, result=result, is_error=reply.is_error)


class GrpcConnector:
    """A channel through services.kit.channels (mTLS when the router has a certificate),
    health-checked at every discovery; the target's hosts re-checked at every connection."""

    def __init__(self, config: BackendConfig, label: str, policy: HostPolicy) -> None:
        self._config = config
        self._label = label
        self._policy = policy
        self.died = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Session]:
        for host, port in target_hosts(self._config.target):
            try:
                await self._policy.resolve_checked(host, port)
            except HostRefused as refused:
                raise BackendFault(
                    grpc.StatusCode.UNAVAILABLE, f"backend {self._label}: {refused}"
                ) from None
        channel = open_channel(self._config.target)
        try:
            yield GrpcSession(channel, self._label)
        finally:
            await channel.close()


def connector(
    config: BackendConfig,
    label: str,
    *,
    executable: str,
    policy: HostPolicy,
    stderr_lines_per_s: float,
) -> Connector:
    if config.kind is Kind.MCP_STDIO:
        return StdioConnector(config, label, executable, stderr_lines_per_s)
    if config.kind is Kind.MCP_HTTP:
        return HttpConnector(config, label, policy)
    return GrpcConnector(config, label, policy)
