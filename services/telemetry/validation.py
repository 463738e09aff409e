"""Checks of telemetry's requests: (field, problem) pairs naming the field, never the input.

Limits are the kit's (services.kit.limits), the same the senders clip to. Every value is
checked before it is converted or stored, so a caller's mistake answers INVALID_ARGUMENT and
can never surface as an INTERNAL from a conversion or the database (a Timestamp outside what
protobuf or a 64-bit nanosecond column can hold, an unknown enum number, a huge page token).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence, Sized

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.kit.audit import KNOWN_ACTIONS
from services.kit.limits import (
    MAX_AMOUNT,
    MAX_BATCH,
    MAX_CONTRACT_VERSIONS,
    MAX_DETAILS_CHARS,
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
)
from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

RESERVATION_ID = re.compile(r"[0-9a-f]{32}")
TRACE_ID = re.compile(r"[0-9a-f]{32}")
NS_PER_S = 1_000_000_000
# Times are stored as signed 64-bit nanoseconds since the epoch: 1970 to 2262-04-11.
MAX_STORED_NS = 2**63 - 1
# What google.protobuf.Timestamp itself allows: 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
# Longest duration a record may report: a day, far above any request's deadline.
MAX_DURATION_MS = 86_400_000.0
STORED_TIME = "a time between 1970-01-01 and 2262-04-11 UTC"
# Prompt versions a usage record may name ("name@version"); stored comma-joined in 512 chars.
MAX_PROMPTS = 4
MAX_PROMPT_REF_CHARS = 100

Violations = list[tuple[str, str]]


def caller(where: str, value: common_pb2.Caller) -> Violations:
    if not value.tenant:
        return [(f"{where}caller.tenant", "required")]
    if len(value.tenant) > MAX_KEY_CHARS:
        return [(f"{where}caller.tenant", f"at most {MAX_KEY_CHARS} characters")]
    return []


def texts(
    where: str, message: Message, required: tuple[str, ...], optional: tuple[str, ...]
) -> Violations:
    found = [(f"{where}{name}", "required") for name in required if not getattr(message, name)]
    found += [
        (f"{where}{name}", f"at most {MAX_KEY_CHARS} characters")
        for name in (*required, *optional)
        if len(getattr(message, name)) > MAX_KEY_CHARS
    ]
    return found


def amounts(where: str, message: Message, names: tuple[str, ...]) -> Violations:
    return [
        (f"{where}{name}", f"between 0 and {MAX_AMOUNT}")
        for name in names
        if not 0 <= getattr(message, name) <= MAX_AMOUNT
    ]


def batch(name: str, items: Sized) -> Violations:
    if not 1 <= len(items) <= MAX_BATCH:
        return [(name, f"1 to {MAX_BATCH} items")]
    return []


def stamp_ns(stamp: Timestamp) -> int:
    """Nanoseconds since the epoch of a Timestamp that passed ``timestamp``."""
    return stamp.seconds * NS_PER_S + stamp.nanos


def timestamp(where: str, message: Message, name: str, *, required: bool) -> Violations:
    """A Timestamp field that is valid protobuf and fits the stored range (1970..2262)."""
    field = f"{where}{name}"
    if not message.HasField(name):
        return [(field, f"required, {STORED_TIME}")] if required else []
    stamp: Timestamp = getattr(message, name)
    if not 0 <= stamp.nanos < NS_PER_S:
        return [(f"{field}.nanos", "between 0 and 999999999")]
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        return [(f"{field}.seconds", "within the years 1 to 9999")]
    if not 0 < stamp_ns(stamp) <= MAX_STORED_NS:
        return [(field, STORED_TIME)]
    return []


def enum_value(field: str, value: int, allowed: Sequence[int], names: str) -> Violations:
    return [] if value in allowed else [(field, f"one of {names}")]


def duration(field: str, value: float) -> Violations:
    # Written so that NaN fails too.
    if not 0 <= value <= MAX_DURATION_MS:
        return [(field, f"between 0 and {MAX_DURATION_MS:.0f} milliseconds")]
    return []


def usage_record(i: int, record: telemetry_pb2.UsageRecord) -> Violations:
    where = f"records[{i}]."
    found = texts(
        where,
        record,
        ("request_id", "tenant"),
        (
            "principal",
            "route",
            "tool_name",
            "tool_version",
            "outcome",
            "service",
            "model",
            "rules_version",
        ),
    )
    if len(record.prompts) > MAX_PROMPTS or any(
        not p or len(p) > MAX_PROMPT_REF_CHARS or "," in p for p in record.prompts
    ):
        found.append(
            (
                f"{where}prompts",
                f"at most {MAX_PROMPTS} names of 1-{MAX_PROMPT_REF_CHARS} characters without ','",
            )
        )
    found += amounts(where, record, ("tokens_in", "tokens_out", "tool_calls", "cost_units"))
    found += timestamp(where, record, "occurred_at", required=True)
    if record.reservation_id and not RESERVATION_ID.fullmatch(record.reservation_id):
        found.append((f"{where}reservation_id", "32 lowercase hexadecimal characters"))
    if record.HasField("duration_ms"):
        found += duration(f"{where}duration_ms", record.duration_ms)
    found += duration(f"{where}tool_duration_ms", record.tool_duration_ms)
    if not 0 <= record.grpc_status_code <= 16:
        found.append((f"{where}grpc_status_code", "a gRPC status code, 0 to 16"))
    found += enum_value(
        f"{where}tool_outcome",
        record.tool_outcome,
        telemetry_pb2.ToolOutcome.values(),
        "UNSPECIFIED, OK, REFUSED, FAILED",
    )
    if record.trace_id and not TRACE_ID.fullmatch(record.trace_id):
        found.append((f"{where}trace_id", "32 lowercase hexadecimal characters"))
    return found


def audit_event(i: int, event: telemetry_pb2.AuditEvent) -> Violations:
    where = f"events[{i}]."
    found = texts(
        where,
        event,
        ("event_id", "tenant", "action"),
        ("actor", "outcome", "request_id", "trace_id", "policy_version"),
    )
    if event.action and event.action not in KNOWN_ACTIONS:
        found.append(
            (f"{where}action", "an action of toolmesh.common.v1.AuditAction, e.g. tool.write")
        )
    found += timestamp(where, event, "occurred_at", required=True)
    if len(event.target) > MAX_TEXT_CHARS:
        found.append((f"{where}target", f"at most {MAX_TEXT_CHARS} characters"))
    versions = event.contract_versions
    if len(versions) > MAX_CONTRACT_VERSIONS or any(
        not v or len(v) > MAX_KEY_CHARS for v in versions
    ):
        found.append(
            (
                f"{where}contract_versions",
                f"at most {MAX_CONTRACT_VERSIONS} non-empty names of {MAX_KEY_CHARS} characters",
            )
        )
    if event.details_json and not _json_object(event.details_json):
        found.append(
            (f"{where}details_json", f"a JSON object of at most {MAX_DETAILS_CHARS} characters")
        )
    return found


def _json_object(text: str) -> bool:
    if len(text) > MAX_DETAILS_CHARS:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def release_figures(
    request: telemetry_pb2.GetReleaseFiguresRequest, kind: str | None, max_versions: int
) -> Violations:
    found: Violations = []
    if kind is None:
        found.append(("kind", "one of TOOL, ROUTING or PROMPT"))
    elif kind != "routing" and not request.name:
        found.append(("name", "required for a tool or prompt"))
    found += texts("", request, (), ("name", "tenant", "objective"))
    if not 1 <= len(request.versions) <= max_versions:
        found.append(("versions", f"1 to {max_versions} versions"))
    for i, window in enumerate(request.versions[:max_versions]):
        where = f"versions[{i}]."
        found += texts(where, window, ("version",), ())
        found += timestamp(where, window, "start", required=True)
        found += timestamp(where, window, "end", required=True)
        if (
            window.HasField("start")
            and window.HasField("end")
            and (
                (window.start.seconds, window.start.nanos) > (window.end.seconds, window.end.nanos)
            )
        ):
            found.append((f"{where}end", "at or after start"))
    return found
