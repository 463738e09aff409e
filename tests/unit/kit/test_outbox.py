"""The durable outbox: nothing committed is lost, failed deliveries back off and retry."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from services.kit.outbox import (
    Item,
    MessageOutbox,
    Outbox,
    Pending,
    Relay,
    send_splitting_refusals,
)
from toolmesh.telemetry.v1 import telemetry_pb2


@pytest.fixture
async def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    box = Outbox(tmp_path / "outbox.db")
    await box.open()
    yield box
    await box.close()


async def test_items_survive_reopening_and_keys_are_unique(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    await box.open()
    await box.put([Item("turns", "r1", b"a"), Item("turns", "r2", b"b")])
    await box.put([Item("turns", "r1", b"changed")])  # same key: kept once, unchanged
    await box.close()
    reopened = Outbox(tmp_path / "outbox.db")
    await reopened.open()
    due = await reopened.due("turns", 10)
    assert [(p.key, p.payload) for p in due] == [("r1", b"a"), ("r2", b"b")]
    assert reopened.depths == {"turns": 2}
    await reopened.close()


async def test_relay_delivers_in_order_and_empties_the_box(outbox: Outbox) -> None:
    got: list[str] = []

    async def deliver(batch: list[Pending]) -> list[tuple[Pending, str]]:
        got.extend(p.key for p in batch)
        return []

    relay = Relay(outbox)
    relay.route("usage", deliver, batch=2)
    await outbox.put([Item("usage", f"k{i}", b"") for i in range(5)])
    while await relay.drain_once():
        pass
    assert got == ["k0", "k1", "k2", "k3", "k4"]
    assert await outbox.refresh_depths() == {"usage": 0}


async def test_failed_delivery_is_kept_and_retried_after_backoff(outbox: Outbox) -> None:
    calls = 0

    async def flaky(batch: list[Pending]) -> list[tuple[Pending, str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("receiver down")
        return []

    relay = Relay(outbox, base_backoff_s=0.0, max_backoff_s=0.0)
    relay.route("audit", flaky)
    await outbox.put([Item("audit", "e1", b"x")])
    assert await relay.drain_once() == 0
    pending = await outbox.due("audit", 10)
    assert [p.attempts for p in pending] == [1]
    assert await relay.drain_once() == 1
    assert await outbox.due("audit", 10) == []


async def test_replay_now_makes_items_in_backoff_due_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway calls it when a receiver whose breaker was open answers again."""
    box = MessageOutbox(tmp_path / "m.db")
    await box.open()
    monkeypatch.setattr(box.relay, "backoff_s", lambda failures: 60.0)
    up = False

    async def send(events: list[telemetry_pb2.AuditEvent]) -> list[tuple[int, str]]:
        if not up:
            raise ConnectionError("receiver down")
        return []

    box.route("audit", telemetry_pb2.AuditEvent, send)
    await box.put_many([("audit", "e1", telemetry_pb2.AuditEvent(event_id="e1"))])
    assert await box.relay.drain_once() == 0
    up = True
    assert await box.relay.drain_once() == 0  # waiting out its 60 s backoff
    await box.replay_now("audit")
    assert await box.relay.drain_once() == 1
    await box.close()


def test_backoff_is_bounded_full_jitter(tmp_path: Path) -> None:
    relay = Relay(Outbox(tmp_path / "x.db"), base_backoff_s=0.1, max_backoff_s=2.0)
    samples = [relay.backoff_s(n) for n in range(1, 30) for _ in range(20)]
    assert all(0 <= s <= 2.0 for s in samples)
    assert max(samples) > 1.0


async def test_refused_items_become_dead_letters_and_the_rest_is_delivered(
    outbox: Outbox,
) -> None:
    told: list[tuple[str, str]] = []

    async def picky(batch: list[Pending]) -> list[tuple[Pending, str]]:
        return [(p, "too long") for p in batch if p.key == "bad"]

    async def notice(item: Pending, reason: str) -> None:
        told.append((item.key, reason))

    relay = Relay(outbox)
    relay.route("audit", picky, on_dead_letter=notice)
    await outbox.put([Item("audit", "good", b"1"), Item("audit", "bad", b"2")])
    assert await relay.drain_once() == 1
    assert await outbox.due("audit", 10) == []
    dead = await outbox.dead_letters()
    assert [(d.key, d.payload, d.reason) for d in dead] == [("bad", b"2", "too long")]
    assert told == [("bad", "too long")]


async def test_splitting_finds_exactly_the_refused_items() -> None:
    sent: list[list[int]] = []

    async def send_all(items: list[int]) -> object:
        sent.append(items)
        if any(i % 7 == 3 for i in items):
            raise ValueError("refused")
        return None

    def refusal(exc: Exception) -> str | None:
        return str(exc) if isinstance(exc, ValueError) else None

    items = list(range(40))
    refused = await send_splitting_refusals(items, send_all, refusal)
    assert [items[i] for i, _ in refused] == [3, 10, 17, 24, 31, 38]
    delivered = {i for batch in sent for i in batch if not any(j % 7 == 3 for j in batch)}
    assert delivered == {i for i in items if i % 7 != 3}


async def test_message_outbox_group_commits_and_routes_typed_messages(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path / "m.db", idle_s=0.01)
    await box.open()
    got: list[str] = []

    async def send(events: list[telemetry_pb2.AuditEvent]) -> list[tuple[int, str]]:
        got.extend(e.event_id for e in events)
        return []

    box.route("audit", telemetry_pb2.AuditEvent, send)
    await asyncio.gather(
        *(
            box.put_many([("audit", str(i), telemetry_pb2.AuditEvent(event_id=str(i)))])
            for i in range(20)
        )
    )
    while await box.relay.drain_once():
        pass
    assert sorted(got, key=int) == [str(i) for i in range(20)]
    await box.close()


async def test_a_closed_outbox_is_not_kept_alive_by_the_depth_gauge(tmp_path: Path) -> None:
    """Servers come and go in one process (tests build hundreds): the depth gauge must not hold
    on to, nor report, the outboxes of servers long gone."""
    box = Outbox(tmp_path / "outbox.db")
    await box.open()
    Relay(box)
    await box.close()
    gone = weakref.ref(box)
    del box
    gc.collect()
    assert gone() is None


async def test_done_deletes_in_one_go_and_counts_the_items_out(outbox: Outbox) -> None:
    await outbox.put([Item("usage", f"u{i}", b"") for i in range(3)])
    await outbox.put([Item("audit", f"a{i}", b"") for i in range(2)])
    due = await outbox.due("usage", 2)
    await outbox.done([p.id for p in due])
    assert outbox.depths == {"usage": 1, "audit": 2}
    assert await outbox.refresh_depths() == {"usage": 1, "audit": 2}
    await outbox.retry_later([p.id for p in await outbox.due("audit", 5)], "down", 60)
    assert await outbox.due("audit", 5) == []  # both moved past now, in one update


async def test_under_load_the_relay_waits_a_window_between_deliveries(outbox: Outbox) -> None:
    """After a delivery that filled no batch the relay waits ``batch_window_s``, so items put
    meanwhile go together; a full batch goes again at once."""
    got: list[list[str]] = []

    async def deliver(batch: list[Pending]) -> list[tuple[Pending, str]]:
        got.append([p.key for p in batch])
        return []

    relay = Relay(outbox, idle_s=0.01, batch_window_s=0.6)
    relay.route("usage", deliver, batch=3)
    task = asyncio.create_task(relay.run())
    try:
        await outbox.put([Item("usage", "k0", b"")])
        while not got:
            await asyncio.sleep(0.01)
        for key in ("k1", "k2"):  # within the window: one delivery
            await outbox.put([Item("usage", key, b"")])
            await asyncio.sleep(0.05)
        while len(got) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the window after the next delivery
        await outbox.put([Item("usage", f"f{i}", b"") for i in range(4)])
        while sum(map(len, got)) < 7:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got == [["k0"], ["k1", "k2"], ["f0", "f1", "f2"], ["f3"]]
