"""Sessions with backends: MCP over stdio and streamable HTTP (the official ``mcp`` SDK's
ClientSession, in services.router.backends.mcp_client, imported with the first MCP backend),
and gRPC ``toolmesh.tool.v1.ToolService``.

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
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.audit import clean
from services.kit.channels import open_channel
from services.router.backends.config import BackendConfig, Kind
from services.router.backends.network import HostPolicy, HostRefused
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
        from services.router.backends.mcp_client import StdioConnector

        return StdioConnector(config, label, executable, stderr_lines_per_s)
    if config.kind is Kind.MCP_HTTP:
        from services.router.backends.mcp_client import HttpConnector

        return HttpConnector(config, label, policy)
    return GrpcConnector(config, label, policy)
