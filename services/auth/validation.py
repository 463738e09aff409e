"""Request checks of the auth RPCs: each returns the (field, description) violations that
services.kit.errors.abort_invalid turns into INVALID_ARGUMENT with google.rpc.BadRequest.

Lists are bounded before their items are looked at: a request of a few MiB can hold a million
one-character scopes, and building one violation per item cost over 100 MB per call. A list
longer than MAX_NAMES gets one violation and its items are not looked at.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from services.auth.policy import NAME_PATTERN, SCOPE_PATTERN
from services.kit.timestamps import timestamp_problem

CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
OPAQUE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SECRET_CHARS = 256
# Scopes or roles one request may name; far above any real client.
MAX_NAMES = 64

Violations = list[tuple[str, str]]


def names(field: str, values: Sequence[str], pattern: str = SCOPE_PATTERN) -> Violations:
    """One violation for a list over MAX_NAMES; else one per bad entry."""
    if len(values) > MAX_NAMES:
        return [(field, f"at most {MAX_NAMES} entries")]
    return [
        (f"{field}[{i}]", "not a valid name")
        for i, value in enumerate(values)
        if not re.fullmatch(pattern, value)
    ]


def roles(values: Sequence[str], known: Collection[str]) -> Violations:
    """Role names the policy defines; bounded like ``names``."""
    if len(values) > MAX_NAMES:
        return [("roles", f"at most {MAX_NAMES} entries")]
    return [
        (f"roles[{i}]", "no such role in the policy")
        for i, role in enumerate(values)
        if role not in known
    ]


def client_id(value: str, *, required: bool = True) -> Violations:
    if not value and not required:
        return []
    if re.fullmatch(CLIENT_ID_PATTERN, value):
        return []
    prefix = "required, " if required else ""
    return [("client_id", f"{prefix}1-64 letters, digits, '_', '.', '-'")]


def tenant(value: str, field: str = "tenant") -> Violations:
    """An optional tenant name (empty: the caller's)."""
    if not value or re.fullmatch(NAME_PATTERN, value):
        return []
    return [(field, "lower-case letters, digits, '_', '.', '-'")]


def opaque_id(field: str, value: str, description: str) -> Violations:
    return [] if re.fullmatch(OPAQUE_ID_PATTERN, value) else [(field, description)]


def timestamp(field: str, value: Timestamp) -> Violations:
    problem = timestamp_problem(value)
    return [(field, problem)] if problem else []


def issue_token(client: str, secret: str, scopes: Sequence[str]) -> Violations:
    violations = client_id(client)
    if not secret or len(secret) > MAX_SECRET_CHARS:
        violations.append(("client_secret", f"required, at most {MAX_SECRET_CHARS} chars"))
    return violations + names("scopes", scopes)
