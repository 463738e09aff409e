"""A session's turns in acknowledgment order, also when some arrive late (SQLite and PostgreSQL).

Late appends are what the gateway's outbox replays after an outage: acknowledged earlier than
turns memory already stored. Each must land where its acknowledgment time puts it, with seq
gapless and increasing in that order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete

from services.kit.db import create_sync_engine
from services.kit.migrations import check_schema
from services.memory.migrations import MIGRATIONS
from services.memory.settings import MemorySettings
from services.memory.store import NewTurn, StoredTurn, TurnRow, TurnStore
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2

from .conftest import FakeClock, MemoryServer
from .test_memory import append_request, history

SECOND = 1_000_000_000


def acked(
    request_id: str, at_ns: int, session_id: str = "s-1", n: int = 2
) -> memory_pb2.AppendTurnsRequest:
    request = append_request(request_id, session_id=session_id, n=n)
    stamp = Timestamp()
    stamp.FromNanoseconds(at_ns)
    request.acknowledged_at.CopyFrom(stamp)
    return request


def order(turns: list[common_pb2.Turn]) -> list[str]:
    """Request ids in history order, one per request (its turns must be adjacent)."""
    ids: list[str] = []
    for turn in turns:
        if not ids or ids[-1] != turn.request_id:
            ids.append(turn.request_id)
    assert len(ids) == len(set(ids)), f"a request's turns are split: {ids}"
    return ids


def assert_gapless(turns: list[common_pb2.Turn]) -> None:
    assert [t.seq for t in turns] == list(range(1, len(turns) + 1))


@pytest.mark.parametrize(
    ("late_at", "expected"),
    [
        (5, ["late", "a", "b", "c"]),  # before everything
        (25, ["a", "b", "late", "c"]),  # in the middle
        (35, ["a", "b", "c", "late"]),  # after everything: no move
    ],
)
async def test_a_late_append_lands_where_it_was_acknowledged(
    memory, clock: FakeClock, late_at: int, expected: list[str]
) -> None:
    t0 = clock.base_ns - 100 * SECOND
    for name, at in (("a", 10), ("b", 20), ("c", 30)):
        await memory.AppendTurns(acked(name, t0 + at * SECOND))
    response = await memory.AppendTurns(acked("late", t0 + late_at * SECOND))
    turns = await history(memory)
    assert order(turns) == expected
    assert_gapless(turns)
    position = expected.index("late")
    assert [t.seq for t in response.turns] == [2 * position + 1, 2 * position + 2]
    # Each request's turns keep their order within it.
    assert [(t.request_id, t.role) for t in turns[2 * position : 2 * position + 2]] == [
        ("late", common_pb2.TURN_ROLE_USER),
        ("late", common_pb2.TURN_ROLE_ASSISTANT),
    ]


async def test_equal_acknowledgment_times_are_ordered_by_request_id(
    memory, clock: FakeClock
) -> None:
    at = clock.base_ns - SECOND
    for name in ("r-c", "r-a", "r-b"):
        await memory.AppendTurns(acked(name, at))
    assert order(await history(memory)) == ["r-a", "r-b", "r-c"]


async def test_without_acknowledged_at_memory_uses_its_own_clock(memory, clock: FakeClock) -> None:
    """Unset means "when memory received it"; a time ahead of memory's clock counts as now,
    so a sender whose clock runs fast cannot put its turns after ones acknowledged later."""
    await memory.AppendTurns(acked("past", clock.base_ns - 60 * SECOND))
    await memory.AppendTurns(append_request("unset-1"))
    await memory.AppendTurns(acked("future", clock.base_ns + 3600 * SECOND))
    await memory.AppendTurns(append_request("unset-2"))
    await memory.AppendTurns(acked("late", clock.base_ns - 30 * SECOND))
    assert order(await history(memory)) == ["past", "late", "unset-1", "future", "unset-2"]


async def test_a_late_duplicate_stores_nothing_and_returns_the_current_seqs(
    memory, clock: FakeClock
) -> None:
    t0 = clock.base_ns - 100 * SECOND
    await memory.AppendTurns(acked("b", t0 + 20 * SECOND))
    await memory.AppendTurns(acked("a", t0 + 10 * SECOND))  # late: b moves to 3, 4
    again = await memory.AppendTurns(acked("b", t0 + 5 * SECOND, n=1))
    assert again.duplicate
    assert [(t.seq, t.request_id) for t in again.turns] == [(3, "b"), (4, "b")]
    turns = await history(memory)
    assert order(turns) == ["a", "b"]
    assert_gapless(turns)


async def test_many_late_appends_from_two_replicas_end_in_acknowledgment_order(
    replicas: list[MemoryServer], clock: FakeClock
) -> None:
    """Concurrent group commits of both replicas, three sessions, arrivals shuffled: every
    session ends in acknowledgment order with gapless seqs (PostgreSQL: row locks between
    replicas; SQLite: the write lock)."""
    rng = random.Random(7)
    t0 = clock.base_ns - 1000 * SECOND
    sessions = ["s-1", "s-2", "s-3"]
    expected: dict[str, list[tuple[int, str]]] = {s: [] for s in sessions}
    requests = []
    for i in range(60):
        session = sessions[i % 3]
        at = t0 + rng.randrange(0, 50) * SECOND  # collisions exercise the request id tie-break
        name = f"r-{i:02d}"
        expected[session].append((at, name))
        requests.append(acked(name, at, session_id=session, n=1 + i % 2))
    rng.shuffle(requests)
    # Waves, so that later waves arrive late relative to turns already committed.
    for wave in range(0, len(requests), 15):
        chunk = requests[wave : wave + 15]
        responses = await asyncio.gather(
            *(replicas[i % 2].stub.AppendTurns(r) for i, r in enumerate(chunk))
        )
        assert not any(r.duplicate for r in responses)
    for session in sessions:
        turns = await history(replicas[1].stub, session_id=session)
        assert order(turns) == [name for _at, name in sorted(expected[session])]
        assert_gapless(turns)


async def test_concurrent_duplicates_of_late_appends_are_stored_once(
    replicas: list[MemoryServer], clock: FakeClock
) -> None:
    t0 = clock.base_ns - 100 * SECOND
    await replicas[0].stub.AppendTurns(acked("z", t0 + 90 * SECOND))
    late = [acked(f"r-{i}", t0 + i * SECOND) for i in range(5)]
    responses = await asyncio.gather(
        *(replicas[i % 2].stub.AppendTurns(late[i % 5]) for i in range(20))
    )
    assert sum(not r.duplicate for r in responses) == 5
    turns = await history(replicas[0].stub)
    assert order(turns) == ["r-0", "r-1", "r-2", "r-3", "r-4", "z"]
    assert_gapless(turns)


# --- one group commit with several late appends, through the store itself -------------------
# asyncio.gather queues every append before the store's flusher runs, so they are written in
# one transaction: the exact case a gRPC test can only hope to hit.


@pytest.fixture
async def store(settings: MemorySettings, clock: FakeClock) -> AsyncIterator[TurnStore]:
    url = settings.resolved_database_url()
    await check_schema(url, MIGRATIONS, migrate_on_start=True)
    turn_store = TurnStore(url, idempotency_window_ns=3600 * SECOND, clock=clock)
    yield turn_store
    await turn_store.close()


def two_turns(name: str) -> list[NewTurn]:
    return [NewTurn("user", f"{name} question"), NewTurn("assistant", f"{name} answer")]


async def test_one_batch_with_several_late_appends(store: TurnStore, clock: FakeClock) -> None:
    t0 = clock.base_ns - 100 * SECOND
    for name, at in (("a", 10), ("b", 20), ("c", 30), ("d", 40)):
        await store.append("acme", "s", name, two_turns(name), acknowledged_at_ns=t0 + at * SECOND)

    def late(name: str, at: int, n: int = 2) -> Coroutine[Any, Any, tuple[list[StoredTurn], bool]]:
        return store.append(
            "acme", "s", name, two_turns(name)[:n], acknowledged_at_ns=t0 + at * SECOND
        )

    results = await asyncio.gather(
        late("x", 15),
        late("y", 25, n=1),
        late("z", 5),
        late("w", 25),  # same time as y: request id first
        late("e", 50),  # later than everything: appended
        late("b", 1),  # duplicate of a stored request: stays where it is
        late("y", 99),  # duplicate within the batch: the first y wins
        late("m", 25),  # same time as w and y, between them by request id
    )
    turns = await store.history("acme", "s", 100)
    ids: list[str] = []
    for turn in turns:
        if not ids or ids[-1] != turn.request_id:
            ids.append(turn.request_id)
    assert ids == ["z", "a", "x", "b", "m", "w", "y", "c", "d", "e"]
    assert [t.seq for t in turns] == list(range(1, len(turns) + 1))
    by_id = {name: [t.seq for t in turns if t.request_id == name] for name in ids}
    stored = dict(zip(["x", "y", "z", "w", "e", "b", "y2", "m"], results, strict=True))
    for name in ("x", "y", "z", "w", "e", "m"):
        seqs, duplicate = stored[name]
        assert not duplicate
        assert [t.seq for t in seqs] == by_id[name]
    # The duplicates report the seqs the turns have after this very transaction.
    for name, key in (("b", "b"), ("y", "y2")):
        seqs, duplicate = stored[key]
        assert duplicate
        assert [t.seq for t in seqs] == by_id[name]

    # The session's order key moved to e: an append between d and e is late, one after e not.
    await store.append("acme", "s", "f", two_turns("f"), acknowledged_at_ns=t0 + 60 * SECOND)
    await store.append("acme", "s", "de", two_turns("de"), acknowledged_at_ns=t0 + 45 * SECOND)
    turns = await store.history("acme", "s", 100)
    assert [t.request_id for t in turns[-6::2]] == ["de", "e", "f"]
    assert [t.seq for t in turns] == list(range(1, len(turns) + 1))


async def test_late_appends_to_several_sessions_in_one_batch(
    store: TurnStore, clock: FakeClock
) -> None:
    t0 = clock.base_ns - 100 * SECOND
    for session in ("s-1", "s-2"):
        for name, at in (("a", 10), ("c", 30)):
            await store.append(
                "acme", session, name, two_turns(name), acknowledged_at_ns=t0 + at * SECOND
            )
    await asyncio.gather(
        *(
            store.append("acme", s, "b", two_turns("b"), acknowledged_at_ns=t0 + 20 * SECOND)
            for s in ("s-2", "s-1")
        ),
        store.append("globex", "s-1", "b", two_turns("b"), acknowledged_at_ns=t0),
    )
    for session in ("s-1", "s-2"):
        turns = await store.history("acme", session, 100)
        assert [t.request_id for t in turns[::2]] == ["a", "b", "c"]
        assert [t.seq for t in turns] == [1, 2, 3, 4, 5, 6]
    assert [t.seq for t in await store.history("globex", "s-1", 100)] == [1, 2]


async def test_a_late_append_after_the_last_turns_were_deleted(
    store: TurnStore, settings: MemorySettings, clock: FakeClock
) -> None:
    """An operator deleted a session's latest turns (say, for an erasure request) and left the
    session row: a late append still lands, after what is left."""
    t0 = clock.base_ns - 100 * SECOND
    for name, at in (("a", 10), ("b", 20)):
        await store.append("acme", "s", name, two_turns(name), acknowledged_at_ns=t0 + at * SECOND)
    engine = create_sync_engine(settings.resolved_database_url())
    try:
        with engine.begin() as conn:
            conn.execute(delete(TurnRow).where(TurnRow.request_id == "b"))
    finally:
        engine.dispose()
    stored, _ = await store.append(
        "acme", "s", "late", two_turns("late"), acknowledged_at_ns=t0 + 15 * SECOND
    )
    assert [t.seq for t in stored] == [5, 6]
    assert [t.request_id for t in await store.history("acme", "s", 100)] == [
        "a",
        "a",
        "late",
        "late",
    ]


async def test_under_concurrent_load_appends_wait_for_one_shared_commit(
    settings: MemorySettings, clock: FakeClock
) -> None:
    """Once a transaction carried several appends, the next one to find the writer idle waits
    the group-commit window, so an append arriving just after it shares its transaction; a
    lone append (the first here) is written at once."""
    url = settings.resolved_database_url()
    await check_schema(url, MIGRATIONS, migrate_on_start=True)
    # Wide, so a loaded machine cannot make the test miss the window.
    turn_store = TurnStore(
        url, idempotency_window_ns=3600 * SECOND, clock=clock, group_commit_window_s=0.5
    )
    batches: list[list[str]] = []
    write_all = turn_store._write_all

    def counting(batch: list[Any]) -> None:
        batches.append([item.request_id for item in batch])
        write_all(batch)

    turn_store._write_all = counting  # type: ignore[method-assign]
    try:
        await turn_store.append("acme", "s", "alone", two_turns("alone"))
        await asyncio.gather(
            turn_store.append("acme", "s", "p", two_turns("p")),
            turn_store.append("acme", "t", "q", two_turns("q")),
        )
        first = asyncio.create_task(turn_store.append("acme", "s", "r", two_turns("r")))
        await asyncio.sleep(0.05)  # within the window
        second = asyncio.create_task(turn_store.append("acme", "t", "u", two_turns("u")))
        (r_turns, _), (u_turns, _) = await asyncio.gather(first, second)
    finally:
        await turn_store.close()
    assert batches == [["alone"], ["p", "q"], ["r", "u"]]
    # Both acknowledged after the one commit, with the seqs it gave them.
    assert [t.seq for t in r_turns] == [5, 6] and [t.seq for t in u_turns] == [3, 4]
