"""The outbox as a table shared by replicas: claims with a lease, nothing lost, nothing twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.migrations import MIGRATIONS, PREFIX
from services.kit import migrations as kit
from services.kit.outbox import Item
from services.kit.outbox_table import TableOutbox
from tests.pgutil import fresh_databases


@pytest.fixture
def url() -> Iterator[str]:
    with fresh_databases("outbox") as urls:
        yield urls["outbox"]


async def test_replicas_share_the_table_without_sending_an_item_twice(url: str) -> None:
    await kit.upgrade(url, MIGRATIONS)
    first, second = TableOutbox(url, PREFIX, lease_s=60), TableOutbox(url, PREFIX, lease_s=60)
    await first.open()
    await second.open()
    try:
        await first.put([Item("usage", f"usage:{i}", b"x") for i in range(5)])
        await first.put([Item("usage", "usage:0", b"changed")])  # a key is queued once
        mine = await first.due("usage", 3)
        theirs = await second.due("usage", 10)
        assert [p.key for p in mine] == ["usage:0", "usage:1", "usage:2"]
        assert [p.key for p in theirs] == ["usage:3", "usage:4"]  # claimed ones skipped
        assert await second.due("usage", 10) == []
        await second.done([p.id for p in theirs])
        # A replica that dies holding a claim: its items come back when the lease ends.
        await first.retry_later([p.id for p in mine], "gone", 0)
        assert [p.key for p in await second.due("usage", 10)] == [p.key for p in mine]
        await second.dead_letter([(mine[0].id, "refused")])
        assert [d.key for d in await first.dead_letters("usage")] == ["usage:0"]
        assert await first.refresh_depths() == {"usage": 2}
    finally:
        await first.close()
        await second.close()
