"""Checks of the ledger, budget and audit requests: (field, problem) pairs, never the input."""

from __future__ import annotations

import json
import re
from typing import Any

from services.telemetry.spans import MAX_KEY_CHARS

MAX_BATCH = 1000
# Far above any real request, far below where integer micros could overflow 64 bits.
MAX_AMOUNT = 10**12
MAX_TEXT_CHARS = 4096
MAX_DETAILS_CHARS = 65536
MAX_CONTRACT_VERSIONS = 32
RESERVATION_ID = re.compile(r"[0-9a-f]{32}")

Violations = list[tuple[str, str]]


def caller(request: Any) -> Violations:
    if not request.caller.tenant:
        return [("caller.tenant", "required")]
    if len(request.caller.tenant) > MAX_KEY_CHARS:
        return [("caller.tenant", f"at most {MAX_KEY_CHARS} characters")]
    return []


def texts(
    where: str, message: Any, required: tuple[str, ...], optional: tuple[str, ...]
) -> Violations:
    found = [(f"{where}{name}", "required") for name in required if not getattr(message, name)]
    found += [
        (f"{where}{name}", f"at most {MAX_KEY_CHARS} characters")
        for name in (*required, *optional)
        if len(getattr(message, name)) > MAX_KEY_CHARS
    ]
    return found


def amounts(where: str, message: Any, names: tuple[str, ...]) -> Violations:
    return [
        (f"{where}{name}", f"between 0 and {MAX_AMOUNT}")
        for name in names
        if not 0 <= getattr(message, name) <= MAX_AMOUNT
    ]


def batch(name: str, items: Any) -> Violations:
    if not 1 <= len(items) <= MAX_BATCH:
        return [(name, f"1 to {MAX_BATCH} items")]
    return []


def timestamp(where: str, message: Any, name: str) -> Violations:
    if not message.HasField(name) or getattr(message, name).ToNanoseconds() <= 0:
        return [(f"{where}{name}", "required, after 1970")]
    return []


def usage_record(i: int, record: Any) -> Violations:
    where = f"records[{i}]."
    found = texts(
        where,
        record,
        ("request_id", "tenant"),
        ("principal", "route", "tool_name", "tool_version", "outcome"),
    )
    found += amounts(where, record, ("tokens_in", "tokens_out", "tool_calls", "cost_units"))
    found += timestamp(where, record, "occurred_at")
    if record.reservation_id and not RESERVATION_ID.fullmatch(record.reservation_id):
        found.append((f"{where}reservation_id", "32 lowercase hexadecimal characters"))
    return found


def audit_event(i: int, event: Any) -> Violations:
    where = f"events[{i}]."
    found = texts(
        where,
        event,
        ("event_id", "tenant", "action"),
        ("actor", "outcome", "request_id", "trace_id", "policy_version"),
    )
    found += timestamp(where, event, "occurred_at")
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
