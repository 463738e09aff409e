"""The durable outbox: nothing committed is lost, failed deliveries back off and retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.outbox import Item, Outbox, Pending, Relay


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

    async def deliver(batch: list[Pending]) -> None:
        got.extend(p.key for p in batch)

    relay = Relay(outbox)
    relay.route("usage", deliver, batch=2)
    await outbox.put([Item("usage", f"k{i}", b"") for i in range(5)])
    while await relay.drain_once():
        pass
    assert got == ["k0", "k1", "k2", "k3", "k4"]
    assert await outbox.refresh_depths() == {"usage": 0}


async def test_failed_delivery_is_kept_and_retried_after_backoff(outbox: Outbox) -> None:
    calls = 0

    async def flaky(batch: list[Pending]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("receiver down")

    relay = Relay(outbox, base_backoff_s=0.0, max_backoff_s=0.0)
    relay.route("audit", flaky)
    await outbox.put([Item("audit", "e1", b"x")])
    assert await relay.drain_once() == 0
    pending = await outbox.due("audit", 10)
    assert [p.attempts for p in pending] == [1]
    assert await relay.drain_once() == 1
    assert await outbox.due("audit", 10) == []


def test_backoff_is_bounded_full_jitter(tmp_path: Path) -> None:
    relay = Relay(Outbox(tmp_path / "x.db"), base_backoff_s=0.1, max_backoff_s=2.0)
    samples = [relay.backoff_s(n) for n in range(1, 30) for _ in range(20)]
    assert all(0 <= s <= 2.0 for s in samples)
    assert max(samples) > 1.0
