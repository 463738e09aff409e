"""What the CLI prints: short human text by default, the full message as JSON with --json."""

from __future__ import annotations

import json

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2


def as_json(message: Message, indent: int | None = 2) -> str:
    """Proto field names, every field present, int64 as numbers where they fit."""
    return json.dumps(
        json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True,
            unquote_int64_if_possible=True,
        ),
        indent=indent,
        ensure_ascii=False,
    )


def _enum_text(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower().replace("_", " ")


def format_run(reply: gateway_pb2.RunResponse) -> str:
    return reply.answer + "\n\n" + format_run_facts(reply)


def format_run_facts(reply: gateway_pb2.RunResponse) -> str:
    """Everything about a Run's answer but the answer itself."""
    parts = reply.confidence_parts
    tool = f"{reply.tool_name}@{reply.tool_version}" if reply.tool_name else "none"
    outcome = _enum_text(gateway_pb2.Outcome.Name(reply.outcome), "OUTCOME_")
    rows = [
        ("tool", tool),
        (
            "confidence",
            f"{reply.confidence:.2f} (intent {parts.intent:.2f}, schema {parts.schema_fit:.2f}, "
            f"health {parts.health:.2f})",
        ),
        ("outcome", outcome),
        ("routed by", _enum_text(router_pb2.RouteMethod.Name(reply.route_method), "ROUTE_METHOD_")),
        ("tokens", _tokens(reply)),
        ("request id", reply.request_id),
        ("trace id", reply.trace_id or "-"),
        ("degraded", ", ".join(reply.degraded) or "none"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def format_progress(event: gateway_pb2.RunStreamResponse) -> str:
    """One line per step of a streamed Run (the answer's text is printed as it comes)."""
    kind = event.WhichOneof("event")
    if kind == "routed":
        routed = event.routed
        how = _enum_text(router_pb2.RouteMethod.Name(routed.route_method), "ROUTE_METHOD_")
        if not routed.tool_name:
            return f"routed: no tool ({how}): {routed.reason}"
        return (
            f"routed: {routed.tool_name}@{routed.tool_version} by {how}, "
            f"confidence {routed.confidence:.2f}"
        )
    if kind == "tool_started":
        return f"tool {event.tool_started.tool_name} started"
    if kind == "tool_finished":
        finished = event.tool_finished
        outcome = _enum_text(gateway_pb2.Outcome.Name(finished.outcome), "OUTCOME_")
        return f"tool {finished.tool_name} finished: {outcome} ({finished.duration_ms:.1f} ms)"
    return kind or "?"


def _tokens(reply: gateway_pb2.RunResponse) -> str:
    usage = reply.usage
    if not usage.model:
        return "none (no model consulted)"
    prompts = ", ".join(f"{p.name}@{p.version}" for p in reply.prompts)
    return f"{usage.tokens_in} in, {usage.tokens_out} out ({usage.model}; prompts {prompts})"


def format_history(reply: gateway_pb2.GetHistoryResponse) -> str:
    if not reply.turns:
        return "(no turns)"
    lines = []
    for turn in reply.turns:
        role = _enum_text(common_pb2.TurnRole.Name(turn.role), "TURN_ROLE_")
        tool = f"  [{turn.tool_name}@{turn.tool_version}]" if turn.tool_name else ""
        lines.append(f"{turn.seq:>4}  {role:<9} {turn.content}{tool}")
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_tools(reply: gateway_pb2.ListToolsResponse) -> str:
    if not reply.tools:
        return "(no tools allowed)"
    return table(
        ["TOOL", "VERSION", "SIDE EFFECT", "BACKEND", "COST", "TIMEOUT", "DESCRIPTION"],
        [
            [
                t.name,
                t.version,
                t.side_effect,
                f"{t.backend} ({t.backend_kind})" if t.backend else "builtin",
                str(t.cost_units),
                f"{t.timeout_ms}ms",
                # A backend's description is its own text: one line of it, as data.
                " ".join(t.description.split()),
            ]
            for t in reply.tools
        ],
    )


def format_stats(reply: gateway_pb2.GetStatsResponse, group_by: str) -> str:
    if not reply.rows:
        return "(no data in this window)"
    key_headers = {"service": ["SERVICE"], "route": ["SERVICE", "ROUTE"], "tool": ["TOOL"]}[
        group_by
    ]
    rows = []
    for row in reply.rows:
        keys = {
            "service": [row.service],
            "route": [row.service, row.route],
            "tool": [f"{row.tool_name}@{row.tool_version}" if row.tool_version else row.tool_name],
        }[group_by]
        rows.append(
            [
                *keys,
                str(row.count),
                f"{row.error_rate:.1%}",
                f"{row.p50_ms:.1f}",
                f"{row.p95_ms:.1f}",
                f"{row.p99_ms:.1f}",
            ]
        )
    return table([*key_headers, "COUNT", "ERRORS", "P50 MS", "P95 MS", "P99 MS"], rows)


def format_rpc_error(err: grpc.RpcError) -> str:
    """``error: CODE: message`` plus one line per BadRequest field violation."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    name = code.name if code is not None else "UNKNOWN"
    lines = [f"error: {name}: {details or 'no details'}"]
    try:
        status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    except ValueError:  # a details trailer that disagrees with the status: show the status only
        status = None
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
            lines += [f"  {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)
