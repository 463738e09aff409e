"""The toolmesh.memory.v1.Memory RPCs: validation, tenant scoping, conversions to the store."""

from __future__ import annotations

import re

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.buildinfo import service_info
from services.kit.errors import abort_invalid
from services.memory.settings import MemorySettings
from services.memory.store import NewTurn, StoredTurn, TurnStore
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc

CONTRACT_VERSIONS = ["toolmesh.memory.v1"]
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_TURNS_PER_REQUEST = 16
MAX_CONTENT_CHARS = 16_000
# Bounded so they fit their indexed columns.
MAX_ID_CHARS = 128
MAX_TOOL_VERSION_CHARS = 64

_ROLE_NAMES = {
    common_pb2.TURN_ROLE_USER: "user",
    common_pb2.TURN_ROLE_ASSISTANT: "assistant",
}
_ROLE_VALUES = {name: value for value, name in _ROLE_NAMES.items()}


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


def _scope_violations(caller: common_pb2.Caller, session_id: str) -> list[tuple[str, str]]:
    violations = _text_violations("caller.tenant", caller.tenant, MAX_ID_CHARS, required=True)
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        violations.append(("session_id", "1-128 characters of A-Z a-z 0-9 . _ : -"))
    return violations


def _append_violations(request: memory_pb2.AppendTurnsRequest) -> list[tuple[str, str]]:
    violations = _scope_violations(request.caller, request.session_id)
    violations += _text_violations("request_id", request.request_id, MAX_ID_CHARS, required=True)
    if not 1 <= len(request.turns) <= MAX_TURNS_PER_REQUEST:
        violations.append(("turns", f"between 1 and {MAX_TURNS_PER_REQUEST} turns"))
    for i, turn in enumerate(request.turns):
        if turn.role not in _ROLE_NAMES:
            violations.append((f"turns[{i}].role", "must be USER or ASSISTANT"))
        violations += _text_violations(f"turns[{i}].content", turn.content, MAX_CONTENT_CHARS)
        violations += _text_violations(f"turns[{i}].tool_name", turn.tool_name, MAX_ID_CHARS)
        violations += _text_violations(
            f"turns[{i}].tool_version", turn.tool_version, MAX_TOOL_VERSION_CHARS
        )
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
            request.caller.tenant, request.session_id, request.request_id, turns
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

    async def GetServiceInfo(
        self, request: memory_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> memory_pb2.GetServiceInfoResponse:
        return memory_pb2.GetServiceInfoResponse(
            info=service_info(self._settings.service_name, CONTRACT_VERSIONS)
        )
