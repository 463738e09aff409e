"""The toolmesh.memory.v1.Memory RPCs: validation, tenant scoping, conversions to the store."""

from __future__ import annotations

import re

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.buildinfo import service_info
from services.kit.errors import abort_invalid
from services.memory.settings import MemorySettings
from services.memory.store import ClaimState, Completion, NewTurn, StoredTurn, TurnStore
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc

CONTRACT_VERSIONS = ["toolmesh.memory.v1"]
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_TURNS_PER_REQUEST = 16
MAX_CONTENT_CHARS = 16_000
# Bounded so they fit their indexed columns.
MAX_ID_CHARS = 128
MAX_TOOL_VERSION_CHARS = 64
# A content fingerprint: a digest in hex or base64, optionally prefixed ("sha256:...").
FINGERPRINT_PATTERN = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
FINGERPRINT_RULE = "1-128 characters of A-Z a-z 0-9 . _ : + / = -"
# A serialized answer kept for retries; far above a Run's answer, bounded so records stay small.
MAX_RESPONSE_BYTES = 256 * 1024
# A claim's lease: 1 ms to 10 minutes.
MAX_LEASE_MS = 600_000
# The latest second a google.protobuf.Timestamp may hold (9999-12-31T23:59:59Z).
_MAX_TIMESTAMP_SECONDS = 253_402_300_799

_ROLE_NAMES = {
    common_pb2.TURN_ROLE_USER: "user",
    common_pb2.TURN_ROLE_ASSISTANT: "assistant",
}
_ROLE_VALUES = {name: value for value, name in _ROLE_NAMES.items()}
_CLAIM_STATES = {
    ClaimState.CLAIMED: memory_pb2.CLAIM_STATE_CLAIMED,
    ClaimState.COMPLETED: memory_pb2.CLAIM_STATE_COMPLETED,
    ClaimState.IN_PROGRESS: memory_pb2.CLAIM_STATE_IN_PROGRESS,
    ClaimState.CONFLICT: memory_pb2.CLAIM_STATE_CONFLICT,
}


def _text_violations(
    field: str, value: str, max_chars: int, *, required: bool = False
) -> list[tuple[str, str]]:
    if required and not value:
        return [(field, "required")]
    if len(value) > max_chars:
        return [(field, f"at most {max_chars} characters")]
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it on every backend alike.
        return [(field, "must not contain NUL characters")]
    return []


def _scope_violations(
    caller: common_pb2.Caller, session_id: str, *, sessionless: bool = False
) -> list[tuple[str, str]]:
    """The tenant and session; ``sessionless`` admits an empty session id (a request made
    outside any conversation, such as a direct tool call)."""
    violations = _text_violations("caller.tenant", caller.tenant, MAX_ID_CHARS, required=True)
    if not (sessionless and not session_id) and not SESSION_ID_PATTERN.fullmatch(session_id):
        violations.append(("session_id", "1-128 characters of A-Z a-z 0-9 . _ : -"))
    return violations


def _append_violations(request: memory_pb2.AppendTurnsRequest) -> list[tuple[str, str]]:
    # Without turns an append only completes a request's claim with its answer (a request
    # outside any session); then the session may be empty and the answer is required.
    answer_only = not request.turns and bool(request.fingerprint)
    violations = _scope_violations(request.caller, request.session_id, sessionless=answer_only)
    violations += _text_violations("request_id", request.request_id, MAX_ID_CHARS, required=True)
    if not answer_only and not 1 <= len(request.turns) <= MAX_TURNS_PER_REQUEST:
        violations.append(("turns", f"between 1 and {MAX_TURNS_PER_REQUEST} turns"))
    if answer_only and request.session_id:
        violations.append(("turns", "required in a session"))
    for i, turn in enumerate(request.turns):
        if turn.role not in _ROLE_NAMES:
            violations.append((f"turns[{i}].role", "must be USER or ASSISTANT"))
        violations += _text_violations(f"turns[{i}].content", turn.content, MAX_CONTENT_CHARS)
        violations += _text_violations(f"turns[{i}].tool_name", turn.tool_name, MAX_ID_CHARS)
        violations += _text_violations(
            f"turns[{i}].tool_version", turn.tool_version, MAX_TOOL_VERSION_CHARS
        )
    if request.HasField("acknowledged_at"):
        stamp = request.acknowledged_at
        if not (0 <= stamp.seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 10**9):
            violations.append(("acknowledged_at", "a valid time after 1970-01-01T00:00:00Z"))
    if request.fingerprint and not FINGERPRINT_PATTERN.fullmatch(request.fingerprint):
        violations.append(("fingerprint", FINGERPRINT_RULE))
    # Both or neither, so that a completed request with an empty answer means "not kept".
    if request.response and not request.fingerprint:
        violations.append(("fingerprint", "required with a response"))
    if request.fingerprint and not request.response:
        violations.append(("response", "required with a fingerprint"))
    if len(request.response) > MAX_RESPONSE_BYTES:
        violations.append(("response", f"at most {MAX_RESPONSE_BYTES} bytes"))
    return violations


def _claim_violations(request: memory_pb2.ClaimRequestRequest) -> list[tuple[str, str]]:
    violations = _scope_violations(request.caller, request.session_id, sessionless=True)
    violations += _text_violations("request_id", request.request_id, MAX_ID_CHARS, required=True)
    if not FINGERPRINT_PATTERN.fullmatch(request.fingerprint):
        violations.append(("fingerprint", FINGERPRINT_RULE))
    if not 1 <= request.lease_ms <= MAX_LEASE_MS:
        violations.append(("lease_ms", f"between 1 and {MAX_LEASE_MS}"))
    return violations


def _to_proto(turn: StoredTurn) -> common_pb2.Turn:
    created_at = Timestamp()
    created_at.FromNanoseconds(turn.created_at_ns)
    return common_pb2.Turn(
        role=_ROLE_VALUES[turn.role],
        content=turn.content,
        request_id=turn.request_id,
        seq=turn.seq,
        created_at=created_at,
        tool_name=turn.tool_name,
        tool_version=turn.tool_version,
    )


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(self, settings: MemorySettings, store: TurnStore) -> None:
        self._settings = settings
        self._store = store

    async def AppendTurns(
        self, request: memory_pb2.AppendTurnsRequest, context: aio.ServicerContext
    ) -> memory_pb2.AppendTurnsResponse:
        violations = _append_violations(request)
        if violations:
            await abort_invalid(context, violations)
        turns = [
            NewTurn(
                role=_ROLE_NAMES[turn.role],
                content=turn.content,
                tool_name=turn.tool_name,
                tool_version=turn.tool_version,
            )
            for turn in request.turns
        ]
        stored, duplicate = await self._store.append(
            request.caller.tenant,
            request.session_id,
            request.request_id,
            turns,
            acknowledged_at_ns=(
                request.acknowledged_at.ToNanoseconds()
                if request.HasField("acknowledged_at")
                else None
            ),
            completion=(
                Completion(request.fingerprint, request.response) if request.fingerprint else None
            ),
        )
        return memory_pb2.AppendTurnsResponse(
            turns=[_to_proto(turn) for turn in stored], duplicate=duplicate
        )

    async def GetHistory(
        self, request: memory_pb2.GetHistoryRequest, context: aio.ServicerContext
    ) -> memory_pb2.GetHistoryResponse:
        violations = _scope_violations(request.caller, request.session_id)
        if request.limit < 0:
            violations.append(("limit", "must not be negative"))
        if violations:
            await abort_invalid(context, violations)
        limit = min(
            request.limit or self._settings.default_history_limit,
            self._settings.max_history_limit,
        )
        turns = await self._store.history(request.caller.tenant, request.session_id, limit)
        return memory_pb2.GetHistoryResponse(turns=[_to_proto(turn) for turn in turns])

    async def ClaimRequest(
        self, request: memory_pb2.ClaimRequestRequest, context: aio.ServicerContext
    ) -> memory_pb2.ClaimRequestResponse:
        violations = _claim_violations(request)
        if violations:
            await abort_invalid(context, violations)
        result = await self._store.claim(
            request.caller.tenant,
            request.request_id,
            request.session_id,
            request.fingerprint,
            request.lease_ms * 1_000_000,
        )
        response = memory_pb2.ClaimRequestResponse(
            state=_CLAIM_STATES[result.state], response=result.response, conflict=result.conflict
        )
        if result.lease_expires_at_ns:
            response.lease_expires_at.FromNanoseconds(result.lease_expires_at_ns)
        return response

    async def ReleaseRequest(
        self, request: memory_pb2.ReleaseRequestRequest, context: aio.ServicerContext
    ) -> memory_pb2.ReleaseRequestResponse:
        violations = _text_violations(
            "caller.tenant", request.caller.tenant, MAX_ID_CHARS, required=True
        )
        violations += _text_violations(
            "request_id", request.request_id, MAX_ID_CHARS, required=True
        )
        if not FINGERPRINT_PATTERN.fullmatch(request.fingerprint):
            violations.append(("fingerprint", FINGERPRINT_RULE))
        if violations:
            await abort_invalid(context, violations)
        released = await self._store.release(
            request.caller.tenant, request.request_id, request.fingerprint
        )
        return memory_pb2.ReleaseRequestResponse(released=released)

    async def GetServiceInfo(
        self, request: memory_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> memory_pb2.GetServiceInfoResponse:
        return memory_pb2.GetServiceInfoResponse(
            info=service_info(self._settings.service_name, CONTRACT_VERSIONS)
        )
