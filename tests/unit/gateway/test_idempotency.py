"""An idempotency key is bound to the request's content (issue 9, finding 3)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from tests.unit.gateway.conftest import GatewayUnderTest, bearer
from toolmesh.gateway.v1 import gateway_pb2


def _request(prompt: str, key: str, session: str = "s-1") -> gateway_pb2.RunRequest:
    return gateway_pb2.RunRequest(session_id=session, prompt=prompt, idempotency_key=key)


async def test_same_key_and_content_replays_the_answer_without_running_or_charging(
    gw: GatewayUnderTest,
) -> None:
    first = await gw.stub.Run(_request("what is 2 + 2", "k1"), metadata=bearer(gw.token()))
    invocations = len(gw.fakes.router.invocations)
    second = await gw.stub.Run(_request("what is 2 + 2", "k1"), metadata=bearer(gw.token()))
    assert second.replayed and not first.replayed
    assert (second.request_id, second.answer, second.trace_id) == (
        first.request_id,
        first.answer,
        first.trace_id,
    )
    assert len(gw.fakes.router.invocations) == invocations, "the tool ran again"
    assert len(gw.fakes.memory.turns[("acme", "s-1")]) == 2, "the turns were stored again"


@pytest.mark.parametrize(
    ("prompt", "session", "reason"),
    [
        ("what is 3 + 3", "s-1", "different request"),
        ("what is 2 + 2", "s-2", "another session"),
    ],
)
async def test_same_key_with_other_content_or_session_is_failed_precondition(
    gw: GatewayUnderTest, prompt: str, session: str, reason: str
) -> None:
    await gw.stub.Run(_request("what is 2 + 2", "k2"), metadata=bearer(gw.token()))
    invocations = len(gw.fakes.router.invocations)
    with pytest.raises(aio.AioRpcError) as err:
        await gw.stub.Run(_request(prompt, "k2", session), metadata=bearer(gw.token()))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason in (err.value.details() or "")
    assert len(gw.fakes.router.invocations) == invocations


async def test_ten_concurrent_reuses_run_the_tool_once(gw: GatewayUnderTest) -> None:
    gw.fakes.router.invoke_delay_s = 0.3
    results = await asyncio.gather(
        *(
            gw.stub.Run(_request("note: buy milk", "k3"), metadata=bearer(gw.token()), timeout=5)
            for _ in range(10)
        ),
        return_exceptions=True,
    )
    answered = [r for r in results if isinstance(r, gateway_pb2.RunResponse)]
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(answered) == 1 and len(refused) == 9
    assert {e.code() for e in refused} == {grpc.StatusCode.ABORTED}
    assert len(gw.fakes.router.invocations) == 1
    # Once the first is done, a retry gets its answer back.
    again = await gw.stub.Run(_request("note: buy milk", "k3"), metadata=bearer(gw.token()))
    assert again.replayed and again.request_id == answered[0].request_id


async def test_a_key_that_cannot_be_checked_is_unavailable(gw: GatewayUnderTest) -> None:
    gw.fakes.memory.fail_writes = True
    invocations = len(gw.fakes.router.invocations)
    with pytest.raises(aio.AioRpcError) as err:
        await gw.stub.Run(_request("what is 2 + 2", "k4"), metadata=bearer(gw.token()))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(gw.fakes.router.invocations) == invocations
    # Without a key the Run still answers (its turns wait in the outbox).
    reply = await gw.stub.Run(
        gateway_pb2.RunRequest(session_id="s-1", prompt="what is 2 + 2"),
        metadata=bearer(gw.token()),
    )
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert "memory" in reply.degraded


async def test_a_request_refused_before_its_tool_ran_gives_its_key_back(
    gw: GatewayUnderTest,
) -> None:
    """A retry with the same key after a refusal is served at once, not "in progress"."""
    reader = gw.token(scope="tools:read")
    with pytest.raises(aio.AioRpcError) as err:
        await gw.stub.Run(_request("note: buy milk", "k5"), metadata=bearer(reader))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not gw.fakes.router.invocations
    reply = await gw.stub.Run(_request("note: buy milk", "k5"), metadata=bearer(gw.token()))
    assert reply.tool_name == "save_note" and not reply.replayed
