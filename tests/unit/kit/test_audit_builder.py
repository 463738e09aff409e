"""The shared audit-event builder: every field a caller influences fits telemetry's limits."""

from __future__ import annotations

import json

import pytest

from services.kit.audit import (
    KNOWN_ACTIONS,
    UNKNOWN_TENANT,
    action_name,
    audit_event,
    clean,
    dead_letter_notice,
)
from services.kit.limits import MAX_DETAILS_CHARS, MAX_KEY_CHARS, MAX_TEXT_CHARS
from toolmesh.common.v1 import audit_pb2


def test_every_action_but_unspecified_has_a_name() -> None:
    values = audit_pb2.AuditAction.DESCRIPTOR.values
    assert len(KNOWN_ACTIONS) == len(values) - 1
    assert action_name(audit_pb2.AUDIT_ACTION_TOOL_WRITE) == "tool.write"
    with pytest.raises(ValueError, match="vocabulary"):
        action_name(audit_pb2.AUDIT_ACTION_UNSPECIFIED)


def test_oversized_and_hostile_fields_are_clipped_and_cleaned() -> None:
    event = audit_event(
        action=audit_pb2.AUDIT_ACTION_AUTH_FAILURE,
        tenant="",
        actor="a\x00b\ud800c" * 200,
        target="t" * 10_000,
        outcome="refused",
        request_id="r" * 5000,
        details={"reason": "x" * 100_000, "k\n": 1},
    )
    assert event.tenant == UNKNOWN_TENANT
    assert len(event.actor) == MAX_KEY_CHARS and "\x00" not in event.actor
    assert "\ud800" not in event.actor
    assert len(event.target) == MAX_TEXT_CHARS
    assert len(event.request_id) == MAX_KEY_CHARS
    details = json.loads(event.details_json)
    assert len(event.details_json) <= MAX_DETAILS_CHARS
    assert len(details["reason"]) == MAX_TEXT_CHARS
    assert "k\ufffd" in details
    event.SerializeToString()  # encodable: no lone surrogates left


def test_huge_details_stay_a_json_object() -> None:
    event = audit_event(
        action=audit_pb2.AUDIT_ACTION_TOOL_WRITE,
        tenant="t",
        actor="a",
        target="x",
        outcome="success",
        details={f"k{i}": "v" * 4000 for i in range(40)},
    )
    details = json.loads(event.details_json)
    assert details["truncated"] is True and "k0" in details["keys"]


def test_dead_letter_notice_is_stable_and_names_the_refused_event() -> None:
    refused = audit_event(
        action=audit_pb2.AUDIT_ACTION_PERMISSION_DENIED,
        tenant="acme",
        actor="svc",
        target="Run",
        outcome="denied",
    )
    first = dead_letter_notice(refused, "events[0].target: too long")
    second = dead_letter_notice(refused, "events[0].target: too long")
    assert first.event_id == second.event_id != refused.event_id
    assert first.action == "audit.dead_letter" and first.tenant == "acme"
    assert json.loads(first.details_json)["refused_event_id"] == refused.event_id


def test_clean_keeps_ordinary_text() -> None:
    assert clean("tool calculator@1.0.0 — ok") == "tool calculator@1.0.0 — ok"
