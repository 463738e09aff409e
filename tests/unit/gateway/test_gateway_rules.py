"""Validation, deadline arithmetic and authorization decisions, as pure rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.authn import Policy, Principal
from gateway.authz import authorize_tool, required_scope
from gateway.pipeline import request_id_for
from gateway.validation import HistoryInput, RunInput
from services.kit.allowlist import entry_problem, tool_allowed
from services.kit.deadlines import Deadline, DeadlineSpentError
from services.kit.errors import violations_from
from toolmesh.router.v1 import router_pb2


def _fields(**kwargs: object) -> list[str]:
    with pytest.raises(ValidationError) as err:
        RunInput(**{"session_id": "s-1", "prompt": "what is 1 + 1", **kwargs})  # type: ignore[arg-type]
    return [field for field, _ in violations_from(err.value)]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "bell \x07"}, "prompt"),
        ({"prompt": "escape \x1b[31m"}, "prompt"),
        ({"prompt": "c1 \x85"}, "prompt"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": "has space"}, "session_id"),
        ({"session_id": "slash/no"}, "session_id"),
        ({"session_id": "s" * 129}, "session_id"),
        ({"idempotency_key": "k" * 129}, "idempotency_key"),
    ],
)
def test_each_bad_field_is_named(overrides: dict[str, str], field: str) -> None:
    assert _fields(**overrides) == [field]


def test_every_bad_field_is_named_at_once() -> None:
    assert sorted(_fields(session_id="", prompt="")) == ["prompt", "session_id"]


def test_violation_messages_do_not_echo_the_input() -> None:
    with pytest.raises(ValidationError) as err:
        RunInput(session_id="s", prompt="secret-\x00-value")
    assert all("secret" not in message for _, message in violations_from(err.value))


def test_good_input_with_newlines_tabs_and_the_longest_values() -> None:
    run = RunInput(session_id="a.B_c:d-" + "x" * 120, prompt="line 1\n\tline 2" + "y" * 3980)
    assert run.idempotency_key == ""


@pytest.mark.parametrize("limit", [-1, 1001])
def test_history_limit_is_bounded(limit: int) -> None:
    with pytest.raises(ValidationError) as err:
        HistoryInput(session_id="s", limit=limit)
    assert [f for f, _ in violations_from(err.value)] == ["limit"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("caller_s", "expected_s"),
    [(None, 10.0), (2.0, 2.0), (100.0, 30.0), (30.0, 30.0)],
)
def test_request_budget_is_the_callers_or_the_default_capped(
    caller_s: float | None, expected_s: float
) -> None:
    clock = Clock()
    deadline = Deadline.for_request(caller_s, default_s=10, max_s=30, reserve_ms=50, clock=clock)
    assert deadline.remaining() == pytest.approx(expected_s)
    assert deadline.timeout() == pytest.approx(expected_s - 0.05)


def test_budget_shrinks_across_hops_and_runs_out() -> None:
    clock = Clock()
    deadline = Deadline.for_request(1.0, default_s=10, max_s=30, reserve_ms=50, clock=clock)
    clock.now += 0.4
    assert deadline.timeout() == pytest.approx(0.55)
    clock.now += 0.55
    with pytest.raises(DeadlineSpentError):
        deadline.timeout()  # 0.05 left, all of it the reserve
    clock.now += 1
    assert deadline.remaining() == 0.0


def _principal(*scopes: str, tenant: str = "acme") -> Principal:
    return Principal("client-1", tenant, frozenset(scopes), (), "jti")


def _tool(name: str, side_effect: router_pb2.SideEffect) -> router_pb2.ToolContract:
    return router_pb2.ToolContract(name=name, version="1.0.0", side_effect=side_effect)


READ = router_pb2.SIDE_EFFECT_READ_ONLY
WRITE = router_pb2.SIDE_EFFECT_WRITE


def test_policy_denies_tenants_it_does_not_name() -> None:
    policy = Policy("v3", {"acme": frozenset({"*"})})
    assert policy.allowed_tools("acme") == frozenset({"*"})
    assert policy.allowed_tools("stranger") == frozenset()


def test_allowlist_star_and_names() -> None:
    assert tool_allowed("anything", frozenset({"*"}))
    assert tool_allowed("calculator", frozenset({"calculator"}))
    assert not tool_allowed("save_note", frozenset({"calculator"}))
    assert not tool_allowed("calculator", frozenset())
    assert tool_allowed("time.get_current_time", {"time.*"})
    assert not tool_allowed("time.", {"time.*"})
    assert not tool_allowed("timer.now", {"time.*"})
    assert not tool_allowed("time", {"time.*"})
    assert entry_problem("time.*") is None and entry_problem("*") is None
    assert entry_problem("ti*me") is not None and entry_problem(".*") is not None


def test_scope_follows_side_effect_and_unspecified_counts_as_write() -> None:
    assert required_scope(READ) == "tools:read"
    assert required_scope(WRITE) == "tools:write"
    assert required_scope(router_pb2.SIDE_EFFECT_UNSPECIFIED) == "tools:write"


@pytest.mark.parametrize(
    ("scopes", "tool", "allowed", "ok", "missing"),
    [
        (("tools:read",), _tool("calculator", READ), {"*"}, True, ""),
        (("tools:read",), _tool("save_note", WRITE), {"*"}, False, "tools:write"),
        (("tools:write",), _tool("calculator", READ), {"*"}, False, "tools:read"),
        (("tools:read", "tools:write"), _tool("save_note", WRITE), {"save_note"}, True, ""),
        (("tools:read", "tools:write"), _tool("save_note", WRITE), {"calculator"}, False, ""),
    ],
)
def test_tool_decisions(
    scopes: tuple[str, ...],
    tool: router_pb2.ToolContract,
    allowed: set[str],
    ok: bool,
    missing: str,
) -> None:
    decision = authorize_tool(_principal(*scopes), tool, frozenset(allowed))
    assert decision.allowed is ok
    assert decision.missing_scope == missing
    if missing:
        assert missing in decision.reason


def test_request_id_is_stable_per_key_and_caller_and_fresh_without_one() -> None:
    alice, bob = _principal(tenant="a"), _principal(tenant="b")
    assert request_id_for(alice, "k") == request_id_for(alice, "k")
    assert request_id_for(alice, "k") != request_id_for(bob, "k")
    assert request_id_for(alice, "k") != request_id_for(alice, "k2")
    assert request_id_for(alice, "") != request_id_for(alice, "")
    assert len(request_id_for(alice, "k")) == 32
