"""Translation between MCP and the Gateway contract, in both directions, as pure functions.

What MCP has no field for travels in ``_meta`` under the ``toolmesh/`` prefix:

    tools/call params._meta    toolmesh/idempotencyKey   required for a write-capable tool
                               toolmesh/sessionId        remember the call in this session
                                                         (default: the caller's, see
                                                         default_session)
                               toolmesh/version          run exactly this version
    tools/list  tool._meta     toolmesh/version, toolmesh/sideEffect, toolmesh/backend,
                               toolmesh/fingerprint, toolmesh/costUnits
    tools/call result._meta    toolmesh/requestId, toolmesh/traceId, toolmesh/tool,
                               toolmesh/outcome, toolmesh/replayed, toolmesh/costMicros,
                               toolmesh/currency, toolmesh/degraded

How a gateway status becomes an MCP answer (docs/mcp.md has the table): a refusal the caller
(or its model) can act on is a tool result with ``isError: true`` whose text says what to do;
an unknown tool is JSON-RPC "invalid params" as the MCP specification asks; anything else is a
JSON-RPC internal error. UNAUTHENTICATED never reaches here: the HTTP layer answers 401.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import mcp_types as types
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from mcp.shared.exceptions import MCPError

from toolmesh.gateway.v1 import gateway_pb2

META_IDEMPOTENCY_KEY = "toolmesh/idempotencyKey"
META_SESSION_ID = "toolmesh/sessionId"
META_VERSION = "toolmesh/version"
DEFAULT_SESSION_PREFIX = "mcp:"
# The gateway's session id rule: 1-128 characters of [A-Za-z0-9._:-].
_SESSION_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,124}")
# The CallToolRequest field each _meta key fills, for the gateway's field violations.
_META_OF_FIELD = {
    "idempotency_key": META_IDEMPOTENCY_KEY,
    "session_id": META_SESSION_ID,
    "version": META_VERSION,
}
SCOPE_READ = "tools:read"
SCOPE_WRITE = "tools:write"
READ_ONLY = "read_only"
_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_OUTCOMES = {
    gateway_pb2.OUTCOME_TOOL_ANSWERED: "tool_answered",
    gateway_pb2.OUTCOME_TOOL_ERROR: "tool_error",
    gateway_pb2.OUTCOME_FALLBACK: "fallback",
    gateway_pb2.OUTCOME_NO_MATCH: "no_match",
}
# Refusals a caller can act on: a tool result with isError, never a protocol error.
_TOOL_LEVEL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


# -- tools/list -------------------------------------------------------------------------------


def visible(tool: gateway_pb2.Tool, scopes: frozenset[str]) -> bool:
    """Whether the caller's scopes let it call the tool: read-only tools need tools:read, any
    other side effect (write, or one the contract does not state) tools:write."""
    return (SCOPE_READ if tool.side_effect == READ_ONLY else SCOPE_WRITE) in scopes


def _object_schema(text: str) -> dict[str, Any] | None:
    """A JSON Schema whose root is an object (all MCP accepts), or None."""
    if not text:
        return None
    try:
        schema = json.loads(text)
    except ValueError:
        return None
    return schema if isinstance(schema, dict) and schema.get("type") == "object" else None


def mcp_tool(tool: gateway_pb2.Tool) -> types.Tool:
    """A gateway tool as MCP lists it.

    The name is the tool's toolmesh name (``calculator``, ``time.get_current_time``), stable
    across versions so a client's configuration survives an upgrade; the title carries the
    version (``calculator@1.0.0``) and ``_meta`` the rest of the contract. The description is
    passed through as data.
    """
    meta: dict[str, Any] = {
        META_VERSION: tool.version,
        "toolmesh/sideEffect": tool.side_effect,
        "toolmesh/backend": tool.backend or "builtin",
        "toolmesh/costUnits": tool.cost_units,
    }
    if tool.fingerprint:
        meta["toolmesh/fingerprint"] = tool.fingerprint
    return types.Tool(
        name=tool.name,
        title=f"{tool.name}@{tool.version}",
        description=tool.description or None,
        input_schema=_object_schema(tool.input_schema_json) or dict(_OBJECT_SCHEMA),
        output_schema=_object_schema(tool.output_schema_json),
        annotations=types.ToolAnnotations(read_only_hint=tool.side_effect == READ_ONLY),
        _meta=meta,
    )


# -- tools/call -------------------------------------------------------------------------------


class MetaError(ValueError):
    """A ``toolmesh/`` _meta entry of the wrong type."""


def _meta_text(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key, "")
    if not isinstance(value, str):
        raise MetaError(f'_meta "{key}" must be a string')
    return value


def default_session(subject: str) -> str:
    """The session of a call whose ``_meta`` names none: ``mcp:<subject>``, or ``mcp:`` and
    32 hex digits of the subject's SHA-256 when the subject is no valid session id.

    The face is stateless and MCP clients rarely name a session, yet the notes tools keep
    their notes per session: a stable session per caller lets save_note and a later
    list_notes meet, from any replica, across MCP connections. It is the caller's, not a
    secret: sessions are tenant-wide, as for every gateway caller.
    """
    if _SESSION_SAFE.fullmatch(subject):
        return DEFAULT_SESSION_PREFIX + subject
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return DEFAULT_SESSION_PREFIX + digest


def call_request(params: types.CallToolRequestParams, subject: str) -> gateway_pb2.CallToolRequest:
    """The CallTool request for an MCP tools/call by ``subject``; MetaError for a malformed
    _meta entry.

    Everything else (the name, the arguments, the key and session formats) is the gateway's
    to judge, so there is one rule for gRPC and MCP callers alike.
    """
    meta: Mapping[str, Any] = params.meta or {}
    return gateway_pb2.CallToolRequest(
        tool=params.name,
        version=_meta_text(meta, META_VERSION),
        arguments_json=json.dumps(params.arguments or {}, ensure_ascii=False),
        session_id=_meta_text(meta, META_SESSION_ID) or default_session(subject),
        idempotency_key=_meta_text(meta, META_IDEMPOTENCY_KEY),
    )


def _structured(result_json: str) -> dict[str, Any] | None:
    if not result_json:
        return None
    try:
        value = json.loads(result_json)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def call_result(reply: gateway_pb2.CallToolResponse) -> types.CallToolResult:
    """A CallTool answer as an MCP tool result.

    The tool answered: its text, and its result as structuredContent (also as JSON text, as
    MCP asks for clients that do not read structured content). The tool declined its input
    (OUTCOME_TOOL_ERROR, MCP's own isError) or could not run (OUTCOME_FALLBACK, the contract's
    fallback answer): isError with that text, so a model does not take it for a result.
    """
    answered = reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    content: list[types.TextContent] = [types.TextContent(type="text", text=reply.answer)]
    structured = _structured(reply.result_json) if answered else None
    if structured is not None and reply.result_json.strip() != reply.answer.strip():
        content.append(types.TextContent(type="text", text=reply.result_json))
    return types.CallToolResult(
        content=list(content),
        structured_content=structured,
        is_error=not answered,
        _meta={
            "toolmesh/requestId": reply.request_id,
            "toolmesh/traceId": reply.trace_id,
            "toolmesh/tool": f"{reply.tool_name}@{reply.tool_version}",
            "toolmesh/outcome": _OUTCOMES.get(reply.outcome, "unspecified"),
            "toolmesh/replayed": reply.replayed,
            "toolmesh/costMicros": reply.cost_micros,
            "toolmesh/currency": reply.currency,
            "toolmesh/degraded": list(reply.degraded),
        },
    )


def tool_error(text: str, **meta: Any) -> types.CallToolResult:
    """A refusal as MCP's tool-level error: the model reads the text and can act on it."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        is_error=True,
        _meta={f"toolmesh/{k}": v for k, v in meta.items()} or None,
    )


@dataclass
class Details:
    """The google.rpc details of a gateway error that matter to an MCP caller."""

    violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None


def details_of(err: aio.AioRpcError) -> Details:
    found = Details()
    for key, value in err.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except ValueError:
            return found
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(bad_request):
                found.violations += [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Unpack(retry):
                found.retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
    return found


def _violation_text(field_name: str, description: str) -> str:
    meta_key = _META_OF_FIELD.get(field_name)
    if meta_key:
        return f'_meta "{meta_key}": {description}'
    if field_name == "arguments_json":
        return f"arguments: {description}"
    if field_name == "tool":
        return f"name: {description}"
    return f"{field_name}: {description}"


def refusal(err: aio.AioRpcError, tool: str) -> types.CallToolResult:
    """A gateway refusal of tools/call as MCP answers it; raises MCPError for protocol errors."""
    code, message = err.code(), err.details() or ""
    details = details_of(err)
    if code == grpc.StatusCode.NOT_FOUND:
        raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {tool} ({message})")
    if code not in _TOOL_LEVEL:
        raise MCPError(types.INTERNAL_ERROR, f"toolmesh could not run {tool}: {code.name}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        fields = [f for f, _ in details.violations]
        if "idempotency_key" in fields and any(
            d.startswith("required") for _, d in details.violations
        ):
            return tool_error(
                f"{tool} is write-capable, so toolmesh runs it only with an idempotency key: "
                f'pass a unique key in the request\'s _meta as "{META_IDEMPOTENCY_KEY}" and send '
                "the same key again when you retry (the first answer is then replayed, never run "
                "twice).",
                code=code.name,
            )
        reasons = [_violation_text(f, d) for f, d in details.violations] or [message]
        return tool_error(f"Invalid call of {tool}: " + "; ".join(reasons), code=code.name)
    retry = (
        f" Retry after {details.retry_after_s:g} s." if details.retry_after_s is not None else ""
    )
    prefix = {
        grpc.StatusCode.PERMISSION_DENIED: f"Not allowed to call {tool}: ",
        grpc.StatusCode.RESOURCE_EXHAUSTED: f"Refused to run {tool}: ",
        grpc.StatusCode.FAILED_PRECONDITION: f"Refused to run {tool}: ",
        grpc.StatusCode.ABORTED: f"{tool} did not run: ",
    }.get(code, f"toolmesh could not run {tool} right now: ")
    meta: dict[str, Any] = {"code": code.name}
    if details.retry_after_s is not None:
        meta["retryAfterSeconds"] = details.retry_after_s
    sentence = message if message.endswith(".") else f"{message or code.name}."
    return tool_error(prefix + sentence + retry, **meta)


def list_error(err: aio.AioRpcError) -> MCPError:
    """A gateway refusal of ListTools as a JSON-RPC error (tools/list has no tool-level form)."""
    code = err.code()
    message = err.details() or code.name
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return MCPError(types.INVALID_REQUEST, f"Not allowed to list tools: {message}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return MCPError(types.INTERNAL_ERROR, f"toolmesh is unavailable right now: {message}")
    return MCPError(types.INTERNAL_ERROR, f"toolmesh could not list tools: {code.name}")
