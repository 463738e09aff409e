"""ClaimRequest and completion by AppendTurns, through real servers (SQLite and PostgreSQL).

The gateway claims a request id derived from an idempotency key before it does any work, and
completes it with the append that stores the Run's turns. Leases and the idempotency window
run on an injected clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from sqlalchemy import func, select

from services.kit.db import create_sync_engine
from services.kit.migrations import check_schema
from services.memory.migrations import MIGRATIONS
from services.memory.settings import MemorySettings
from services.memory.store import PRUNE_BATCH, NewTurn, RequestRow, TurnRow, TurnStore
from toolmesh.memory.v1 import memory_pb2

from .conftest import FakeClock, MemoryServer
from .test_memory import append_request, bad_fields, caller, history

CLAIMED = memory_pb2.CLAIM_STATE_CLAIMED
COMPLETED = memory_pb2.CLAIM_STATE_COMPLETED
IN_PROGRESS = memory_pb2.CLAIM_STATE_IN_PROGRESS
CONFLICT = memory_pb2.CLAIM_STATE_CONFLICT
SECOND = 1_000_000_000
DAY_S = 24 * 3600
FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64


def claim_request(
    request_id: str = "r-1",
    session_id: str = "s-1",
    fingerprint: str = FP,
    lease_ms: int = 5000,
    tenant: str = "acme",
) -> memory_pb2.ClaimRequestRequest:
    return memory_pb2.ClaimRequestRequest(
        caller=caller(tenant),
        request_id=request_id,
        session_id=session_id,
        fingerprint=fingerprint,
        lease_ms=lease_ms,
    )


def completing(
    request_id: str = "r-1",
    session_id: str = "s-1",
    fingerprint: str = FP,
    response: bytes = b"the answer",
) -> memory_pb2.AppendTurnsRequest:
    request = append_request(request_id, session_id=session_id)
    request.fingerprint = fingerprint
    request.response = response
    return request


async def test_a_free_id_is_claimed_then_in_progress_until_its_lease_expires(
    memory, clock: FakeClock
) -> None:
    first = await memory.ClaimRequest(claim_request(lease_ms=5000))
    assert first.state == CLAIMED
    lease = first.lease_expires_at.ToNanoseconds()
    assert 5000 * 10**6 <= lease - clock.base_ns < 5001 * 10**6
    clock.advance(4.9)
    again = await memory.ClaimRequest(claim_request(lease_ms=60_000))
    assert again.state == IN_PROGRESS
    assert again.lease_expires_at.ToNanoseconds() == lease  # the holder's lease, unchanged
    assert not again.response and not again.conflict

    clock.advance(0.2)  # the holder's lease ran out unfinished: the next attempt takes over
    taken = await memory.ClaimRequest(claim_request(lease_ms=1000))
    assert taken.state == CLAIMED
    assert taken.lease_expires_at.ToNanoseconds() > lease
    assert (await memory.ClaimRequest(claim_request())).state == IN_PROGRESS


async def test_other_content_or_session_is_a_conflict_that_names_what_differs(
    memory, clock: FakeClock
) -> None:
    await memory.ClaimRequest(claim_request())
    content = await memory.ClaimRequest(claim_request(fingerprint=OTHER_FP))
    assert (content.state, content.conflict) == (CONFLICT, "content")
    session = await memory.ClaimRequest(claim_request(session_id="s-2"))
    assert (session.state, session.conflict) == (CONFLICT, "session")
    both = await memory.ClaimRequest(claim_request(session_id="s-2", fingerprint=OTHER_FP))
    assert (both.state, both.conflict) == (CONFLICT, "session")
    assert not content.HasField("lease_expires_at")
    # A conflict wins over taking an expired claim over: the first attempt may have acted.
    clock.advance(60)
    expired = await memory.ClaimRequest(claim_request(fingerprint=OTHER_FP))
    assert (expired.state, expired.conflict) == (CONFLICT, "content")


async def test_completion_by_append_returns_the_answer_to_a_retry(memory) -> None:
    assert (await memory.ClaimRequest(claim_request())).state == CLAIMED
    stored = await memory.AppendTurns(completing(response=b"answer-1"))
    assert not stored.duplicate
    retry = await memory.ClaimRequest(claim_request())
    assert (retry.state, retry.response) == (COMPLETED, b"answer-1")
    assert not retry.HasField("lease_expires_at")
    # Once completed, other content or another session is still a conflict.
    assert (await memory.ClaimRequest(claim_request(fingerprint=OTHER_FP))).conflict == "content"
    assert (await memory.ClaimRequest(claim_request(session_id="s-2"))).conflict == "session"
    # A duplicate append changes nothing, not even the kept answer.
    again = await memory.AppendTurns(completing(response=b"answer-2"))
    assert again.duplicate
    assert (await memory.ClaimRequest(claim_request())).response == b"answer-1"
    assert len(await history(memory)) == 2


async def test_completion_without_a_claim_records_the_answer(memory) -> None:
    """The gateway's outbox may deliver the completion after the claim's record is gone."""
    await memory.AppendTurns(completing(response=b"from the outbox"))
    retry = await memory.ClaimRequest(claim_request())
    assert (retry.state, retry.response) == (COMPLETED, b"from the outbox")


async def test_an_expired_claim_is_still_completed_by_its_late_append(
    memory, clock: FakeClock
) -> None:
    await memory.ClaimRequest(claim_request(lease_ms=100))
    clock.advance(3600)  # replayed from the outbox an hour later
    await memory.AppendTurns(completing(response=b"late answer"))
    assert (await memory.ClaimRequest(claim_request())).response == b"late answer"


async def test_turns_without_a_record_mean_completed_without_an_answer(memory) -> None:
    """Stored before claims existed (or after the window): the id cannot run again in its
    session, but the answer is not known; in another session it is free."""
    await memory.AppendTurns(append_request("r-1"))
    same = await memory.ClaimRequest(claim_request())
    assert (same.state, same.response) == (COMPLETED, b"")
    other = await memory.ClaimRequest(claim_request(session_id="s-2"))
    assert other.state == CLAIMED


async def test_turns_stored_under_a_claim_without_its_answer(memory, clock: FakeClock) -> None:
    await memory.ClaimRequest(claim_request(lease_ms=100))
    await memory.AppendTurns(append_request("r-1"))  # no fingerprint: the claim is not told
    assert (await memory.ClaimRequest(claim_request())).state == IN_PROGRESS
    clock.advance(1)
    # The lease ran out, but the turns are there: no takeover (it could never be stored).
    done = await memory.ClaimRequest(claim_request())
    assert (done.state, done.response) == (COMPLETED, b"")
    assert (await memory.ClaimRequest(claim_request())).state == COMPLETED

    await memory.ClaimRequest(claim_request("r-2"))
    await memory.AppendTurns(completing("r-2", fingerprint=OTHER_FP, response=b"other"))
    # Completed by other content: done, no answer for the claimed content.
    assert (await memory.ClaimRequest(claim_request("r-2"))).state == COMPLETED
    assert not (await memory.ClaimRequest(claim_request("r-2"))).response
    assert (await memory.ClaimRequest(claim_request("r-2", fingerprint=OTHER_FP))).conflict == (
        "content"
    )


async def test_claims_are_tenant_scoped(memory) -> None:
    await memory.ClaimRequest(claim_request(tenant="acme"))
    await memory.AppendTurns(completing())
    other = await memory.ClaimRequest(claim_request(tenant="globex", fingerprint=OTHER_FP))
    assert other.state == CLAIMED
    assert (await memory.ClaimRequest(claim_request(tenant="acme"))).response == b"the answer"


@pytest.mark.parametrize("n", [10, 50])
async def test_concurrent_claims_of_one_id_across_replicas_claim_it_once(
    replicas: list[MemoryServer], n: int
) -> None:
    answers = await asyncio.gather(
        *(replicas[i % 2].stub.ClaimRequest(claim_request()) for i in range(n))
    )
    states = [a.state for a in answers]
    assert states.count(CLAIMED) == 1
    assert states.count(IN_PROGRESS) == n - 1
    assert len({a.lease_expires_at.ToNanoseconds() for a in answers}) == 1


async def test_concurrent_takeovers_of_an_expired_claim_take_it_once(
    replicas: list[MemoryServer], clock: FakeClock
) -> None:
    await replicas[0].stub.ClaimRequest(claim_request(lease_ms=100))
    clock.advance(1)
    answers = await asyncio.gather(
        *(replicas[i % 2].stub.ClaimRequest(claim_request()) for i in range(20))
    )
    assert [a.state for a in answers].count(CLAIMED) == 1


async def test_concurrent_claims_and_completion_in_one_batch(
    replicas: list[MemoryServer],
) -> None:
    """Claims racing the completing append see the claim or the answer, never a takeover."""
    await replicas[0].stub.ClaimRequest(claim_request())
    answers = await asyncio.gather(
        replicas[0].stub.AppendTurns(completing()),
        *(replicas[i % 2].stub.ClaimRequest(claim_request()) for i in range(10)),
    )
    assert not answers[0].duplicate
    for answer in answers[1:]:
        assert (answer.state, answer.response) in {(IN_PROGRESS, b""), (COMPLETED, b"the answer")}


async def test_the_idempotency_window(replicas: list[MemoryServer], clock: FakeClock) -> None:
    memory = replicas[0].stub
    await memory.ClaimRequest(claim_request("done"))
    await memory.AppendTurns(completing("done"))
    await memory.ClaimRequest(claim_request("abandoned", lease_ms=1000))
    clock.advance(DAY_S - 2)
    assert (await memory.ClaimRequest(claim_request("done"))).response == b"the answer"
    abandoned = await memory.ClaimRequest(claim_request("abandoned", fingerprint=OTHER_FP))
    assert abandoned.conflict == "content"

    clock.advance(3)  # past both windows (the lease ran 1 s), housekeeping or not
    done = await memory.ClaimRequest(claim_request("done"))
    assert (done.state, done.response) == (COMPLETED, b"")  # its turns still hold the id
    assert (await memory.ClaimRequest(claim_request("done", session_id="s-9"))).state == CLAIMED
    free = await memory.ClaimRequest(claim_request("abandoned", fingerprint=OTHER_FP))
    assert free.state == CLAIMED
    assert len(await history(memory)) == 2  # the window never deletes turns


async def test_housekeeping_deletes_records_past_the_window(
    settings: MemorySettings, clock: FakeClock
) -> None:
    """The service's own background task, every housekeeping_interval_s."""
    quick = settings.model_copy(update={"housekeeping_interval_s": 0.05})
    server = await MemoryServer(quick, clock).start()
    engine = create_sync_engine(quick.resolved_database_url())
    try:
        await server.stub.AppendTurns(completing("old"))
        clock.advance(DAY_S + 1)
        await server.stub.AppendTurns(completing("new"))
        for _ in range(200):
            with engine.connect() as conn:
                left = conn.execute(select(RequestRow.request_id)).scalars().all()
            if left == ["new"]:
                break
            await asyncio.sleep(0.05)
        assert left == ["new"]
        assert len(await history(server.stub)) == 4
    finally:
        engine.dispose()
        await server.stop()


@pytest.fixture
async def store(settings: MemorySettings, clock: FakeClock) -> AsyncIterator[TurnStore]:
    url = settings.resolved_database_url()
    await check_schema(url, MIGRATIONS, migrate_on_start=True)
    turn_store = TurnStore(url, idempotency_window_ns=3600 * SECOND, clock=clock)
    yield turn_store
    await turn_store.close()


async def test_prune_deletes_in_bounded_batches_and_keeps_turns(
    store: TurnStore, settings: MemorySettings, clock: FakeClock
) -> None:
    old = PRUNE_BATCH + 5
    for i in range(0, old, 50):
        await asyncio.gather(
            *(store.claim("acme", f"old-{j}", "s", FP, SECOND) for j in range(i, min(i + 50, old)))
        )
    await store.append("acme", "s", "old-0", [NewTurn("user", "kept")])
    clock.advance(3600 + 2)  # the window runs from the end of the 1 s leases
    await store.claim("acme", "recent", "s", FP, SECOND)  # its window has not even begun
    assert await store.prune() == old
    assert await store.prune() == 0
    engine = create_sync_engine(settings.resolved_database_url())
    try:
        with engine.connect() as conn:
            assert conn.execute(select(RequestRow.request_id)).scalars().all() == ["recent"]
            assert conn.execute(select(func.count()).select_from(TurnRow)).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (claim_request(tenant=""), "caller.tenant"),
        (claim_request(request_id=""), "request_id"),
        (claim_request(request_id="r" * 129), "request_id"),
        (claim_request(request_id="nul\x00"), "request_id"),
        (claim_request(session_id="bad/id"), "session_id"),
        (claim_request(fingerprint=""), "fingerprint"),
        (claim_request(fingerprint="f" * 129), "fingerprint"),
        (claim_request(fingerprint="has space"), "fingerprint"),
        (claim_request(lease_ms=0), "lease_ms"),
        (claim_request(lease_ms=-1), "lease_ms"),
        (claim_request(lease_ms=600_001), "lease_ms"),
    ],
)
async def test_claim_validation_names_the_field(validating, request_, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await validating.ClaimRequest(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [field]


async def test_claim_limits_are_inclusive(memory) -> None:
    longest = await memory.ClaimRequest(claim_request(fingerprint="f" * 128, lease_ms=600_000))
    assert longest.state == CLAIMED
    await memory.AppendTurns(completing(fingerprint="f" * 128, response=b"x" * 256 * 1024))
    kept = await memory.ClaimRequest(claim_request(fingerprint="f" * 128))
    assert len(kept.response) == 256 * 1024


def _ack(seconds: int, nanos: int = 0) -> memory_pb2.AppendTurnsRequest:
    request = append_request("r-1")
    request.acknowledged_at.seconds = seconds
    request.acknowledged_at.nanos = nanos
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_ack(-1), "acknowledged_at"),
        (_ack(1, nanos=-1), "acknowledged_at"),
        (_ack(1, nanos=10**9), "acknowledged_at"),
        (_ack(253_402_300_800), "acknowledged_at"),
        (completing(fingerprint="bad fingerprint"), "fingerprint"),
        (completing(fingerprint=""), "fingerprint"),  # both or neither
        (completing(response=b""), "response"),
        (completing(response=b"x" * (256 * 1024 + 1)), "response"),
    ],
)
async def test_append_validation_of_order_and_completion(validating, request_, field: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await validating.AppendTurns(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [field]
    assert await history(validating) == []


async def test_a_request_outside_any_session_completes_without_turns(memory) -> None:
    """A direct tool call with an idempotency key: claimed, answered, no turns stored."""
    claim = claim_request(session_id="")
    assert (await memory.ClaimRequest(claim)).state == CLAIMED
    answer = memory_pb2.AppendTurnsRequest(
        caller=caller("acme"), request_id="r-1", fingerprint=FP, response=b"answer"
    )
    reply = await memory.AppendTurns(answer)
    assert not reply.turns and not reply.duplicate
    assert (await memory.AppendTurns(answer)).duplicate
    again = await memory.ClaimRequest(claim)
    assert (again.state, again.response) == (COMPLETED, b"answer")
    other = await memory.ClaimRequest(claim_request(session_id="", fingerprint=OTHER_FP))
    assert (other.state, other.conflict) == (CONFLICT, "content")
    # Without an answer to keep, an append without turns is refused.
    with pytest.raises(aio.AioRpcError) as err:
        await memory.AppendTurns(
            memory_pb2.AppendTurnsRequest(caller=caller("acme"), request_id="r-2")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_refused_request_releases_its_claim(memory) -> None:
    """Nothing ran: a retry with the same key claims the id at once, not after the lease."""
    assert (await memory.ClaimRequest(claim_request())).state == CLAIMED
    release = memory_pb2.ReleaseRequestRequest(caller=caller("acme"), request_id="r-1")
    release.fingerprint = OTHER_FP
    assert not (await memory.ReleaseRequest(release)).released  # other content: kept
    release.fingerprint = FP
    assert (await memory.ReleaseRequest(release)).released
    assert (await memory.ClaimRequest(claim_request())).state == CLAIMED
    await memory.AppendTurns(completing())
    # A completed request is never released.
    assert not (await memory.ReleaseRequest(release)).released
    assert (await memory.ClaimRequest(claim_request())).state == COMPLETED
