"""Budget leases (gateway.accounting.BudgetLeases): one reservation serves ``size`` calls,
the last call commits it, a caller whose budget cannot hold a lease reserves per request."""

from __future__ import annotations

import asyncio

from gateway.accounting import BudgetLeases
from toolmesh.common.v1 import common_pb2

CALLER = common_pb2.Caller(tenant="acme", subject="client-1")


class Ledger:
    """Grants leases while ``grant`` is set, numbering them."""

    def __init__(self, grant: bool = True) -> None:
        self.grant = grant
        self.asked: list[tuple[int, int]] = []

    async def acquire(self, calls: int, cost: int) -> str | None:
        self.asked.append((calls, cost))
        await asyncio.sleep(0)
        return f"lease-{len(self.asked)}" if self.grant else None


def leases(now: list[float]) -> BudgetLeases:
    return BudgetLeases(size=4, lifetime_s=30, retry_after_s=5, clock=lambda: now[0])


async def test_concurrent_calls_share_one_lease_and_the_last_commits_it() -> None:
    ledger, now = Ledger(), [0.0]
    pool = leases(now)
    drawn = await asyncio.gather(*(pool.draw(CALLER, 10, ledger.acquire) for _ in range(5)))
    assert ledger.asked == [(4, 40), (4, 40)]
    assert [leased for leased, _ in drawn] == [True] * 5
    # Calls 1-3 send no reservation id, the fourth commits the first lease.
    assert [rid for _, rid in drawn] == ["", "", "", "lease-1", ""]


async def test_a_budget_too_tight_for_a_lease_reserves_per_request_for_a_while() -> None:
    ledger, now = Ledger(grant=False), [0.0]
    pool = leases(now)
    assert await pool.draw(CALLER, 10, ledger.acquire) == (False, "")
    ledger.grant = True
    assert await pool.draw(CALLER, 10, ledger.acquire) == (False, "")
    assert len(ledger.asked) == 1
    now[0] = 6.0
    assert await pool.draw(CALLER, 10, ledger.acquire) == (True, "")


async def test_an_old_lease_or_one_without_cost_left_is_not_drawn_from() -> None:
    ledger, now = Ledger(), [0.0]
    pool = leases(now)
    await pool.draw(CALLER, 10, ledger.acquire)
    now[0] = 31.0
    await pool.draw(CALLER, 10, ledger.acquire)
    assert len(ledger.asked) == 2
    # A dearer call than the lease's estimate left: a new lease at that call's estimate.
    await pool.draw(CALLER, 100, ledger.acquire)
    assert ledger.asked[-1] == (4, 400)


async def test_size_one_never_leases() -> None:
    ledger = Ledger()
    pool = BudgetLeases(size=1, lifetime_s=30, retry_after_s=5)
    assert await pool.draw(CALLER, 10, ledger.acquire) == (False, "")
    assert ledger.asked == []
