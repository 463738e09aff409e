"""Audit events: one builder for every emitter, one vocabulary of actions.

Every service that emits audit events (the gateway, auth) builds them here, so each field a
caller can influence (a request id from metadata, a client id, a tool name, a reason) is
cleaned and clipped to telemetry's limits in one place: an event the trail would refuse can
then only come from a bug, and even that is not dropped silently (the sender's outbox keeps it
as a dead letter and a ``audit.dead_letter`` notice takes its place in the chain).

Actions come from ``toolmesh.common.v1.AuditAction``; the stored name is the value's
``audit_action_name`` option, and telemetry refuses any other name.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from services.kit.limits import (
    MAX_CONTRACT_VERSIONS,
    MAX_DETAILS_CHARS,
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
)
from toolmesh.common.v1 import audit_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

AuditAction = audit_pb2.AuditAction
# Tenant of events where none is known (an unknown client id, an unverifiable token).
UNKNOWN_TENANT = "_unknown"
# Outcomes.
SUCCESS = "success"
FAILURE = "failure"
DENIED = "denied"
REFUSED = "refused"

_NAMES: dict[int, str] = {
    # The generated code is not type-checked (follow_imports = skip), so neither is the key.
    value.number: value.GetOptions().Extensions[audit_pb2.audit_action_name]  # type: ignore[index]
    for value in audit_pb2.AuditAction.DESCRIPTOR.values
    if value.number != audit_pb2.AUDIT_ACTION_UNSPECIFIED
}
KNOWN_ACTIONS = frozenset(_NAMES.values())
# Control characters (C0, DEL, C1) and lone surrogates, which protobuf cannot encode.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:toolmesh:audit")


def action_name(action: int) -> str:
    """The stored name of ``action``; UNSPECIFIED or an unknown number is a bug."""
    try:
        return _NAMES[action]
    except KeyError:
        raise ValueError(f"audit action {action} is not in the vocabulary") from None


def clean(value: str, limit: int = MAX_KEY_CHARS) -> str:
    """Text a caller influenced, made storable: unsafe characters become U+FFFD, then clipped."""
    return _UNSAFE.sub("\ufffd", value[: limit * 2])[:limit]


def derived_event_id(*parts: str) -> str:
    """A stable event id for an event that must be recorded once however often it is sent
    (a retried Run's tool.write, the dead-letter notice of a given event)."""
    return uuid.uuid5(_NAMESPACE, "\x1f".join(parts)).hex


def _details_json(details: Mapping[str, object] | None) -> str:
    if not details:
        return ""
    cleaned = {
        clean(str(key)): clean(value, MAX_TEXT_CHARS) if isinstance(value, str) else value
        for key, value in details.items()
    }
    text = json.dumps(cleaned, sort_keys=True, default=str)
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    # Still a JSON object, still saying which keys there were.
    return json.dumps({"truncated": True, "keys": sorted(cleaned)[:100]}, sort_keys=True)


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def audit_event(
    *,
    action: int,
    tenant: str,
    actor: str,
    target: str,
    outcome: str,
    request_id: str = "",
    trace_id: str = "",
    policy_version: str = "",
    contract_versions: Sequence[str] = (),
    details: Mapping[str, object] | None = None,
    event_id: str = "",
    occurred_at: Timestamp | None = None,
) -> telemetry_pb2.AuditEvent:
    """An event telemetry will accept, whatever the caller put in the fields it influenced."""
    return telemetry_pb2.AuditEvent(
        event_id=clean(event_id) or uuid.uuid4().hex,
        occurred_at=occurred_at if occurred_at is not None else now(),
        tenant=clean(tenant) or UNKNOWN_TENANT,
        actor=clean(actor),
        action=action_name(action),
        target=clean(target, MAX_TEXT_CHARS),
        outcome=clean(outcome),
        request_id=clean(request_id),
        trace_id=clean(trace_id),
        policy_version=clean(policy_version),
        contract_versions=[clean(v) for v in contract_versions if v][:MAX_CONTRACT_VERSIONS],
        details_json=_details_json(details),
    )


def dead_letter_notice(refused: telemetry_pb2.AuditEvent, reason: str) -> telemetry_pb2.AuditEvent:
    """What takes a refused event's place in its tenant's chain: who, what and why it was
    refused, with an id derived from the refused event's (so the notice is recorded once)."""
    return audit_event(
        action=audit_pb2.AUDIT_ACTION_AUDIT_DEAD_LETTER,
        tenant=refused.tenant,
        actor=refused.actor,
        target=refused.action,
        outcome=FAILURE,
        request_id=refused.request_id,
        trace_id=refused.trace_id,
        policy_version=refused.policy_version,
        contract_versions=list(refused.contract_versions),
        details={"refused_event_id": refused.event_id, "reason": reason},
        event_id=derived_event_id("dead-letter", refused.tenant, refused.event_id),
        occurred_at=refused.occurred_at,
    )
