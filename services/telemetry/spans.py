"""OTLP ExportTraceServiceRequest -> flat span records, with the columns GetTrace reads.

Which tenant a span belongs to is taken from its ``toolmesh.tenant`` attribute only when the
peer that exported it may speak for tenants (the gateway; see services.telemetry.ingest): from
any other peer the claim stays in the attributes JSON, for forensics, and attributes nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.kit.limits import MAX_KEY_CHARS

SPAN_KIND_SERVER = trace_pb2.Span.SPAN_KIND_SERVER
_MAX_SPAN_KIND = trace_pb2.Span.SPAN_KIND_CONSUMER
_STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR

# Attributes lifted into columns; the rest is kept as JSON.
_RPC_SERVICE = "rpc.service"
_RPC_METHOD = "rpc.method"
_GRPC_STATUS = "rpc.grpc.status_code"
_TOOL_NAME = "gen_ai.tool.name"
_TOOL_VERSION = "toolmesh.tool.version"
_TENANT = "toolmesh.tenant"
_OPERATION = "gen_ai.operation.name"

# Timestamps are stored as signed 64-bit integers (good until the year 2262).
_MAX_UNIX_NANO = 2**63 - 1


def _value(value: Any) -> Any:
    """An OTLP AnyValue as plain JSON-able Python."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    if which == "double_value" and not math.isfinite(value.double_value):
        # JSON has no NaN or Infinity; keep them readable rather than invalid.
        return str(value.double_value)
    return getattr(value, which)


def _text(value: Any) -> str:
    """A column value: cut to MAX_KEY_CHARS, without NUL (PostgreSQL text cannot hold it)."""
    return "" if value is None else str(value).replace("\x00", "")[:MAX_KEY_CHARS]


def _span_violations(span: trace_pb2.Span, where: str) -> list[tuple[str, str]]:
    violations = []
    if len(span.trace_id) != 16 or not any(span.trace_id):
        violations.append((f"{where}.trace_id", "must be 16 bytes, not all zero"))
    if len(span.span_id) != 8 or not any(span.span_id):
        violations.append((f"{where}.span_id", "must be 8 bytes, not all zero"))
    if len(span.parent_span_id) not in (0, 8):
        violations.append((f"{where}.parent_span_id", "must be empty or 8 bytes"))
    if not 0 <= span.kind <= _MAX_SPAN_KIND:
        violations.append((f"{where}.kind", "unknown span kind"))
    if span.start_time_unix_nano == 0 or span.end_time_unix_nano < span.start_time_unix_nano:
        violations.append((f"{where}.end_time_unix_nano", "must not be before a non-zero start"))
    elif span.end_time_unix_nano > _MAX_UNIX_NANO:
        violations.append((f"{where}.end_time_unix_nano", "must be before the year 2262"))
    return violations


def _record(
    span: trace_pb2.Span, service: str, exporter: str, speaks_for_tenants: bool
) -> dict[str, Any]:
    attributes = {item.key: _value(item.value) for item in span.attributes}
    tenant = attributes.pop(_TENANT, None) if speaks_for_tenants else None
    if _RPC_SERVICE in attributes and _RPC_METHOD in attributes:
        route = f"/{attributes.pop(_RPC_SERVICE)}/{attributes.pop(_RPC_METHOD)}"
    else:
        route = span.name if span.kind == SPAN_KIND_SERVER else ""
    grpc_status = attributes.pop(_GRPC_STATUS, None)
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "service": service,
        "name": _text(span.name),
        "kind": span.kind,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "duration_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
        "error": span.status.code == _STATUS_ERROR,
        "route": _text(route),
        "grpc_status_code": grpc_status if isinstance(grpc_status, int) else None,
        "tool_name": _text(attributes.pop(_TOOL_NAME, None)),
        "tool_version": _text(attributes.pop(_TOOL_VERSION, None)),
        "tenant": _text(tenant),
        "exporter": _text(exporter),
        # Kept in the JSON too: it is a plain attribute, the column only serves the tool query.
        "operation": _text(attributes.get(_OPERATION)),
        "attributes_json": json.dumps(attributes, separators=(",", ":"), sort_keys=True),
    }


def decode(
    request: trace_service_pb2.ExportTraceServiceRequest,
    *,
    exporter: str = "",
    speaks_for_tenants: bool = False,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Span records of an ExportTraceServiceRequest, or the fields that make it malformed.

    ``exporter`` is the peer's certificate name; ``speaks_for_tenants`` whether its
    ``toolmesh.tenant`` attributes are believed.
    """
    records: list[dict[str, Any]] = []
    violations: list[tuple[str, str]] = []
    for r, resource_spans in enumerate(request.resource_spans):
        service = "unknown_service"
        for item in resource_spans.resource.attributes:
            if item.key == "service.name":
                service = _text(_value(item.value)) or service
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for i, span in enumerate(scope_spans.spans):
                problems = _span_violations(
                    span, f"resource_spans[{r}].scope_spans[{s}].spans[{i}]"
                )
                if problems:
                    violations.extend(problems)
                elif not violations:
                    records.append(_record(span, service, exporter, speaks_for_tenants))
    return records, violations
