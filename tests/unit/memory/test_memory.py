"""Memory over gRPC against the real server and database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from services.kit.db import create_engine
from services.memory.migrations import VERSION_TABLE
from services.memory.store import Base
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2

from .conftest import MemoryServer

USER = common_pb2.TURN_ROLE_USER
ASSISTANT = common_pb2.TURN_ROLE_ASSISTANT


def caller(tenant: str = "acme") -> common_pb2.Caller:
    return common_pb2.Caller(subject="svc-test", tenant=tenant, scopes=["tools:read"])


def append_request(
    request_id: str, session_id: str = "s-1", tenant: str = "acme", n: int = 2
) -> memory_pb2.AppendTurnsRequest:
    turns = [
        common_pb2.Turn(role=USER, content=f"{request_id} question"),
        common_pb2.Turn(
            role=ASSISTANT, content=f"{request_id} answer", tool_name="calc", tool_version="1.2.0"
        ),
    ]
    return memory_pb2.AppendTurnsRequest(
        caller=caller(tenant), session_id=session_id, request_id=request_id, turns=turns[:n]
    )


async def history(stub, session_id: str = "s-1", tenant: str = "acme", limit: int = 0):
    response = await stub.GetHistory(
        memory_pb2.GetHistoryRequest(caller=caller(tenant), session_id=session_id, limit=limit)
    )
    return list(response.turns)


def bad_fields(error: aio.AioRpcError) -> list[str]:
    """Fields named by the google.rpc.BadRequest detail of an INVALID_ARGUMENT."""
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields.extend(v.field for v in bad.field_violations)
    return fields


async def test_append_then_history(memory) -> None:
    response = await memory.AppendTurns(append_request("r-1"))
    assert not response.duplicate
    assert [t.seq for t in response.turns] == [1, 2]
    turns = await history(memory)
    assert [(t.seq, t.role, t.content, t.request_id) for t in turns] == [
        (1, USER, "r-1 question", "r-1"),
        (2, ASSISTANT, "r-1 answer", "r-1"),
    ]
    assert (turns[1].tool_name, turns[1].tool_version) == ("calc", "1.2.0")
    assert turns[0].created_at.seconds > 0


async def test_history_returns_most_recent_oldest_first(memory) -> None:
    for i in range(5):
        await memory.AppendTurns(append_request(f"r-{i}"))
    turns = await history(memory, limit=3)
    assert [t.seq for t in turns] == [8, 9, 10]
    assert len(await history(memory)) == 10


async def test_repeat_request_id_is_duplicate_and_writes_nothing(memory) -> None:
    first = await memory.AppendTurns(append_request("r-1"))
    again = await memory.AppendTurns(append_request("r-1", n=1))
    assert again.duplicate
    assert list(again.turns) == list(first.turns)
    assert len(await history(memory)) == 2


async def test_concurrent_appends_across_replicas_keep_order(
    replicas: list[MemoryServer],
) -> None:
    requests = [append_request(f"r-{i:02d}") for i in range(20)]
    responses = await asyncio.gather(
        *(replicas[i % 2].stub.AppendTurns(r) for i, r in enumerate(requests))
    )
    assert not any(r.duplicate for r in responses)
    turns = await history(replicas[1].stub)
    assert [t.seq for t in turns] == list(range(1, 41))
    # Each request's two turns are adjacent and in request order.
    for first, second in zip(turns[::2], turns[1::2], strict=True):
        assert first.request_id == second.request_id
        assert (first.role, second.role) == (USER, ASSISTANT)
    assert sorted(t.request_id for t in turns[::2]) == [f"r-{i:02d}" for i in range(20)]


async def test_concurrent_repeats_of_one_request_store_it_once(
    replicas: list[MemoryServer],
) -> None:
    responses = await asyncio.gather(
        *(replicas[i % 2].stub.AppendTurns(append_request("same")) for i in range(10))
    )
    assert sum(not r.duplicate for r in responses) == 1
    assert {tuple(t.seq for t in r.turns) for r in responses} == {(1, 2)}
    assert len(await history(replicas[0].stub)) == 2


async def test_tenants_are_isolated(memory) -> None:
    await memory.AppendTurns(append_request("r-1", tenant="acme"))
    assert await history(memory, tenant="globex") == []
    # Same session id and request id in another tenant is a different conversation.
    other = await memory.AppendTurns(append_request("r-1", tenant="globex", n=1))
    assert not other.duplicate
    assert [t.seq for t in other.turns] == [1]
    assert len(await history(memory, tenant="acme")) == 2
    assert len(await history(memory, tenant="globex")) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.caller.ClearField("tenant"), "caller.tenant"),
        (lambda r: setattr(r, "session_id", ""), "session_id"),
        (lambda r: setattr(r, "session_id", "has space"), "session_id"),
        (lambda r: setattr(r, "session_id", "x" * 129), "session_id"),
        (lambda r: setattr(r, "request_id", ""), "request_id"),
        (lambda r: r.ClearField("turns"), "turns"),
        (lambda r: r.turns.extend([common_pb2.Turn(role=USER, content="x")] * 15), "turns"),
        (lambda r: setattr(r.turns[0], "role", common_pb2.TURN_ROLE_UNSPECIFIED), "turns[0].role"),
        (lambda r: setattr(r.turns[1], "content", "x" * 16_001), "turns[1].content"),
        (lambda r: setattr(r.turns[1], "content", "nul \x00 byte"), "turns[1].content"),
        (lambda r: setattr(r.turns[1], "tool_version", "v" * 65), "turns[1].tool_version"),
    ],
)
async def test_append_validation_names_the_field(validating, mutate, field: str) -> None:
    request = append_request("r-1")
    mutate(request)
    with pytest.raises(aio.AioRpcError) as caught:
        await validating.AppendTurns(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [field]
    assert field in (caught.value.details() or "")
    assert await history(validating) == []


async def test_limit_defaults_and_is_capped(settings) -> None:
    server = await MemoryServer(
        settings.model_copy(update={"default_history_limit": 2, "max_history_limit": 3})
    ).start()
    try:
        for i in range(3):
            await server.stub.AppendTurns(append_request(f"r-{i}"))
        assert [t.seq for t in await history(server.stub)] == [5, 6]
        assert [t.seq for t in await history(server.stub, limit=1000)] == [4, 5, 6]
    finally:
        await server.stop()


async def test_content_of_16000_chars_is_accepted(memory) -> None:
    request = append_request("r-1", n=1)
    request.turns[0].content = "x" * 16_000
    assert not (await memory.AppendTurns(request)).duplicate


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (memory_pb2.GetHistoryRequest(session_id="s-1"), "caller.tenant"),
        (memory_pb2.GetHistoryRequest(caller=caller(), session_id="bad/id"), "session_id"),
        (memory_pb2.GetHistoryRequest(caller=caller(), session_id="s-1", limit=-1), "limit"),
    ],
)
async def test_history_validation_names_the_field(validating, request_, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await validating.GetHistory(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [field]


async def test_acknowledged_turns_survive_a_restart(settings) -> None:
    server = await MemoryServer(settings).start()
    try:
        await server.stub.AppendTurns(append_request("r-1"))
    finally:
        await server.stop()
    server = await MemoryServer(settings).start()
    try:
        assert [t.content for t in await history(server.stub)] == ["r-1 question", "r-1 answer"]
        again = await server.stub.AppendTurns(append_request("r-1"))
        assert again.duplicate
        assert [t.seq for t in (await server.stub.AppendTurns(append_request("r-2"))).turns] == [
            3,
            4,
        ]
    finally:
        await server.stop()


async def test_service_info(memory) -> None:
    info = (await memory.GetServiceInfo(memory_pb2.GetServiceInfoRequest())).info
    assert info.service == "memory"
    assert list(info.contract_versions) == ["toolmesh.memory.v1"]


async def test_migrations_match_the_models(settings, replicas) -> None:
    engine = create_engine(settings.resolved_database_url())
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"version_table": VERSION_TABLE}),
                    Base.metadata,
                )
            )
    finally:
        await engine.dispose()
    assert diff == []
