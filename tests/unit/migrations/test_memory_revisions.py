"""Memory's revision 0002 on a database with turns, on SQLite and PostgreSQL.

Existing turns take their creation time as acknowledgment time and each session the order key
of its last turn; turns the previous release writes during a rolling update (no acknowledgment
time, no session key) still order by their creation time.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from services.kit import migrations as kit
from services.kit.db import create_sync_engine
from services.memory.migrations import MIGRATIONS
from services.memory.store import NewTurn, TurnStore

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


def old_release_append(conn: Connection, session: str, request_id: str, created_ns: int) -> None:
    """What release 0001's code writes: a turn at last_seq + 1, no acknowledgment time."""
    conn.execute(
        text(
            "INSERT INTO memory_sessions (tenant, session_id, last_seq) VALUES ('acme', :s, 0)"
            " ON CONFLICT DO NOTHING"
        ),
        {"s": session},
    )
    last = conn.execute(
        text("SELECT last_seq FROM memory_sessions WHERE tenant = 'acme' AND session_id = :s"),
        {"s": session},
    ).scalar_one()
    conn.execute(
        text(
            "INSERT INTO memory_turns (tenant, session_id, seq, request_id, position, role,"
            " content, tool_name, tool_version, created_at_ns)"
            " VALUES ('acme', :s, :seq, :r, 0, 'user', :content, '', '', :t)"
        ),
        {"s": session, "seq": last + 1, "r": request_id, "content": request_id, "t": created_ns},
    )
    conn.execute(
        text(
            "UPDATE memory_sessions SET last_seq = :seq WHERE tenant = 'acme' AND session_id = :s"
        ),
        {"s": session, "seq": last + 1},
    )


async def test_existing_turns_take_their_creation_time(database_url: str) -> None:
    await kit.upgrade(database_url, MIGRATIONS, "0001")
    engine = create_sync_engine(database_url)
    try:
        with engine.begin() as conn:
            for i, name in enumerate(["a", "b", "c"]):
                old_release_append(conn, "s-1", name, T0 + (i + 1) * 10 * SECOND)
        await kit.upgrade(database_url, MIGRATIONS, "0002")
        with engine.connect() as conn:
            acked = conn.execute(
                text("SELECT acknowledged_at_ns - created_at_ns FROM memory_turns")
            ).scalars()
            assert set(acked) == {0}
            key = conn.execute(
                text("SELECT last_acknowledged_at_ns, last_request_id FROM memory_sessions")
            ).one()
            assert tuple(key) == (T0 + 30 * SECOND, "c")
            # The previous release keeps writing during the rollout: no key, no time.
            with engine.begin() as write:
                old_release_append(write, "s-1", "d", T0 + 40 * SECOND)
                old_release_append(write, "s-2", "x", T0 + 40 * SECOND)
    finally:
        engine.dispose()

    store = TurnStore(database_url, idempotency_window_ns=3600 * SECOND)

    async def append(name: str, at_s: int | None = None) -> None:
        at = None if at_s is None else T0 + at_s * SECOND
        await store.append("acme", "s-1", name, [NewTurn("user", name)], acknowledged_at_ns=at)

    try:
        await append("e", 50)  # in order: after the old release's d
        await append("late-1", 15)  # between a and b by acknowledgment
        await append("late-2", 35)  # between c and d: d counts as acknowledged when created
        await append("new")
        turns = await store.history("acme", "s-1", 100)
        assert [t.request_id for t in turns] == ["a", "late-1", "b", "c", "late-2", "d", "e", "new"]
        assert [t.seq for t in turns] == list(range(1, 9))
        # A session the old release created has no order key yet: appends go after its turns.
        await store.append("acme", "s-2", "y", [NewTurn("user", "y")], acknowledged_at_ns=T0)
        assert [t.request_id for t in await store.history("acme", "s-2", 100)] == ["x", "y"]
    finally:
        await store.close()

    # Back to 0001 keeps every turn (only the new columns and table go).
    await kit.downgrade(database_url, MIGRATIONS, "0001")
    engine = create_sync_engine(database_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM memory_turns")).scalar_one()
            assert count == 10
    finally:
        engine.dispose()
