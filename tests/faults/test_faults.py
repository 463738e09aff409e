"""The failure suite (issue 5): real processes under steady load, one fault at a time.

`make faults` runs every scenario at full length and writes the table in docs/reliability.md;
`make test` (and so CI) runs the same scenarios shorter. Each scenario passes only if every
acknowledged turn is stored exactly once after recovery and no request outlived its deadline
by more than 50 ms, every acknowledged Run's usage record is stored exactly once in
telemetry's ledger, and the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import grpc
import pytest
from grpc import aio

from gateway.settings import GatewaySettings
from testing.mesh import Mesh
from tests.faults.chaos_tools import rules_with_chaos
from tests.faults.load import LoadResult, run_load
from tests.faults.proxy import DelayProxy
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.faults

FULL = os.environ.get("TOOLMESH_FAULTS_FULL") == "1"
DURATION_S = 10.0 if FULL else 4.0
FAULT_AT_S = 1.0
RECOVER_AFTER_S = 2.5 if FULL else 1.5
RESULTS = Path(os.environ.get("TOOLMESH_FAULTS_RESULTS", "var/faults/results.jsonl"))


@dataclass
class Scenario:
    name: str
    act: Callable[[FaultMesh], None] | None = None
    recover: Callable[[FaultMesh], None] | None = None
    prompts: tuple[str, ...] | None = None
    workers: int = 4
    deadline_s: float = 2.0
    env: dict[str, str] = field(default_factory=dict)
    # Refusals are the promise of a burst; everywhere else every call must be answered.
    refusals_expected: bool = False
    # The scenario's own checks after the load: figures for the report, and what failed.
    checks: Callable[[FaultMesh, LoadResult, str], tuple[dict[str, object], list[str]]] | None = (
        None
    )


@dataclass
class FaultMesh:
    mesh: Mesh
    proxy: DelayProxy | None = None
    # Wall-clock time (time.time()) when the scenario's recovery finished.
    recovered_at: float = 0.0

    def kill(self, name: str) -> None:
        self.mesh.stop(name, sig=signal.SIGKILL)

    def restart(self, name: str) -> None:
        self.mesh.start(name)


def _kill_and_restart(name: str) -> tuple[Callable[[FaultMesh], None], Callable[[FaultMesh], None]]:
    return (lambda fm: fm.kill(name)), (lambda fm: fm.restart(name))


def _slow(fm: FaultMesh) -> None:
    assert fm.proxy is not None
    fm.proxy.delay_s = 0.25


def _fast(fm: FaultMesh) -> None:
    assert fm.proxy is not None
    fm.proxy.delay_s = 0.0


# Issue 10: a hung dependency costs each Run at most this share of its deadline (memory's
# calls are bounded per hop at 250 ms, 5% of the scenario's 5 s deadline, and its breaker
# opens on failures and slow calls; the rest of the bound is room for a loaded machine) ...
HUNG_SHARE_BOUND = 0.3
# ... and turns acknowledged through the outbox start reaching memory this soon after it is back.
REPLAY_START_BOUND_S = 2.0
# The gateway's direct memory write bound (memory_write_timeout_ms).
MEMORY_WRITE_BOUND_S = 0.25


def _freeze_and_thaw(name: str) -> tuple[Callable[[FaultMesh], None], Callable[[FaultMesh], None]]:
    """SIGSTOP: the process keeps its port and accepts connections but never answers."""
    return (
        lambda fm: fm.mesh.procs[name].send_signal(signal.SIGSTOP),
        lambda fm: fm.mesh.procs[name].send_signal(signal.SIGCONT),
    )


def _stored_order(mesh: Mesh, sessions: set[str]) -> dict[str, list[tuple[str, int]]]:
    """Per session, (request id, created_at_ns) of each stored turn pair in seq order, read
    from memory's own database."""
    marks = ",".join("?" * len(sessions))
    with sqlite3.connect(f"file:{mesh.data_dir / 'memory.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT session_id, request_id, MIN(created_at_ns) FROM memory_turns"
            f" WHERE session_id IN ({marks}) GROUP BY session_id, request_id"
            " ORDER BY session_id, MIN(seq)",
            sorted(sessions),
        ).fetchall()
    order: dict[str, list[tuple[str, int]]] = {}
    for session, request_id, created_at_ns in rows:
        order.setdefault(session, []).append((request_id, created_at_ns))
    return order


def _replay_order(
    fm: FaultMesh, result: LoadResult, token: str
) -> tuple[dict[str, object], list[str]]:
    """Each session's stored history is in acknowledgment order (a session's worker waits for
    each answer, so its acknowledged outcomes are in that order), and the outbox's turns start
    reaching memory within REPLAY_START_BOUND_S of its recovery."""
    acknowledged: dict[str, list[str]] = {}
    for outcome in result.outcomes:
        if outcome.acknowledged:
            acknowledged.setdefault(outcome.session, []).append(outcome.request_id)
    stored = _stored_order(fm.mesh, set(acknowledged))
    out_of_order = 0
    for session, expected in acknowledged.items():
        wanted = set(expected)
        got = [request_id for request_id, _ in stored.get(session, []) if request_id in wanted]
        out_of_order += sum(1 for a, b in zip(got, expected, strict=False) if a != b)
    via_outbox = {
        o.request_id for o in result.outcomes if o.acknowledged and "memory" in o.degraded
    }
    # Runs that never waited for memory (answered faster than its write bound): the breaker was
    # open, so their turns can only have reached memory through the outbox's replay (a direct
    # write that timed out may still land when a frozen memory resumes, which is no replay).
    replay_only = {
        o.request_id
        for o in result.outcomes
        if o.request_id in via_outbox and o.latency_s < MEMORY_WRITE_BOUND_S
    }
    stored_at = {
        request_id: created_at_ns / 1e9
        for turns in stored.values()
        for request_id, created_at_ns in turns
        if request_id in via_outbox
    }
    replayed = [at for request_id, at in stored_at.items() if request_id in replay_only]
    replay_start_s = round(max(0.0, min(replayed) - fm.recovered_at), 2) if replayed else None
    replay_done_s = round(max(stored_at.values()) - fm.recovered_at, 2) if stored_at else None
    figures: dict[str, object] = {
        "via_outbox": len(via_outbox),
        "out_of_order": out_of_order,
        "replay_start_s": replay_start_s,
        "replay_done_s": replay_done_s,
    }
    failures = []
    if not via_outbox:
        failures.append("no Run was acknowledged through the outbox: the fault did not bite")
    if out_of_order:
        failures.append(f"{out_of_order} stored turns out of acknowledgment order")
    if replay_start_s is None or replay_start_s > REPLAY_START_BOUND_S:
        failures.append(f"replay started {replay_start_s} s after recovery")
    return figures, failures


def _hung_dependency(
    fm: FaultMesh, result: LoadResult, token: str
) -> tuple[dict[str, object], list[str]]:
    """A frozen memory costs each Run a small bounded share of its deadline, and never starves
    the healthy hops: no Run answers with the router's or a tool's fallback."""
    figures, failures = _replay_order(fm, result, token)
    worst = max((o.latency_s / o.deadline_s for o in result.outcomes), default=0.0)
    starved = sum(
        1
        for o in result.outcomes
        if any(d == "router" or d.startswith("tool:") for d in o.degraded)
    )
    figures |= {"worst_share": round(worst, 3), "starved": starved}
    if worst > HUNG_SHARE_BOUND:
        failures.append(f"a Run spent {worst:.0%} of its deadline on the hung hop")
    if starved:
        failures.append(f"{starved} Runs answered with a healthy hop's fallback")
    return figures, failures


SCENARIOS = [
    Scenario("kill -9 memory, restart", *_kill_and_restart("memory")),
    Scenario("kill -9 router, restart", *_kill_and_restart("router")),
    Scenario("kill -9 telemetry, restart", *_kill_and_restart("telemetry")),
    Scenario("kill -9 auth, restart", *_kill_and_restart("auth")),
    # A hanging tool is given all of a 1 s deadline but the reserve, and the reserve must carry
    # the fallback's durable write (memory, else the outbox's fsync'd group commit) and the
    # answer. The default 50 ms is not enough on a loaded 2-core machine (a Run now and then
    # answered UNAVAILABLE, not acknowledged: nothing lost); docs/reliability.md says so.
    Scenario(
        "a tool that hangs",
        prompts=("chaos hang {n}", "what is {n} + 1"),
        deadline_s=1.0,
        env={"TOOLMESH_GATEWAY_DEADLINE_RESERVE_MS": "150"},
    ),
    Scenario("a tool that fails half its calls", prompts=("chaos flaky w{n}",)),
    Scenario("memory answers slowly (250 ms proxy)", act=_slow, recover=_fast),
    Scenario(
        "a burst of twice the gateway's capacity",
        prompts=("chaos slow b{n}",),
        workers=16,
        env={"TOOLMESH_GATEWAY_MAX_INFLIGHT_RUNS": "8"},
        refusals_expected=True,
    ),
    Scenario(
        "memory hangs (SIGSTOP), then resumes",
        *_freeze_and_thaw("memory"),
        deadline_s=5.0,  # as in issue 10, where such Runs waited 4.96 s of it
        checks=_hung_dependency,
    ),
    Scenario(
        "memory down, outbox replays in order",
        *_kill_and_restart("memory"),
        checks=_replay_order,
    ),
]


@pytest.fixture(params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fault_mesh(scenario: Scenario, tmp_path: Path) -> Iterator[FaultMesh]:
    env = {
        "TOOLMESH_LOG_LEVEL": "INFO",
        "TOOLMESH_ROUTER_PLUGIN_MODULES": "tests.faults.chaos_tools",
        "TOOLMESH_ROUTER_RULES_FILE": str(rules_with_chaos(tmp_path)),
        **scenario.env,
    }
    mesh = Mesh(data_dir=tmp_path / "var", extra_env=env, tls=True)
    proxy = None
    if scenario.act is _slow:
        proxy = DelayProxy(mesh.ports["memory"]).start()
        mesh.extra_env["TOOLMESH_GATEWAY_MEMORY_TARGET"] = f"127.0.0.1:{proxy.port}"
    mesh.start_all()
    try:
        yield FaultMesh(mesh, proxy)
    finally:
        for proc in mesh.procs.values():
            proc.send_signal(signal.SIGCONT)  # a frozen process must hear its SIGTERM
        mesh.stop_all()
        if proxy:
            proxy.stop()


# What a refusal may take beyond the admission queue's wait: the gateway's own work and the
# loaded machine's scheduling (what "immediate" allowed before the bulkhead queued).
REFUSAL_MARGIN_S = 0.2


def _refusal_bound_s(mesh: Mesh, scenario: Scenario) -> float:
    """How long a shed request may take, from the gateway's own settings: a request over a
    bulkhead's limit waits up to admission_wait_ms, never more than half its deadline (issue
    14: a bulkhead may queue briefly within the caller's deadline), then is refused."""
    with mock.patch.dict(os.environ, mesh.env("gateway"), clear=True):
        settings = GatewaySettings()
    wait_s = min(settings.admission_wait_ms / 1000, scenario.deadline_s / 2)
    return wait_s + REFUSAL_MARGIN_S


async def _drive(fm: FaultMesh, scenario: Scenario, token: str) -> LoadResult:
    mesh = fm.mesh
    credentials = mesh.credentials("operator")
    async with aio.secure_channel(mesh.gateway, credentials) as channel:
        kwargs = {"prompts": scenario.prompts} if scenario.prompts else {}
        load = asyncio.create_task(
            run_load(
                channel,
                token,
                workers=scenario.workers,
                duration_s=DURATION_S,
                deadline_s=scenario.deadline_s,
                **kwargs,
            )
        )
        await asyncio.sleep(FAULT_AT_S)
        if scenario.act:
            await asyncio.to_thread(scenario.act, fm)
        await asyncio.sleep(RECOVER_AFTER_S)
        if scenario.recover:
            await asyncio.to_thread(scenario.recover, fm)
        fm.recovered_at = time.time()
        return await load


def _stored_turns(mesh: Mesh, token: str, sessions: set[str]) -> Counter[str] | None:
    """Turns per request id over every session the load used; None while memory is not back."""
    counts: Counter[str] = Counter()
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for session in sessions:
            try:
                reply = stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id=session, limit=1000),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5,
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return None  # reconnecting, or the breaker is still open
                raise
            counts.update(turn.request_id for turn in reply.turns)
    return counts


def _lost_or_doubled(mesh: Mesh, token: str, result: LoadResult) -> tuple[list[str], list[str]]:
    acknowledged = {o.request_id for o in result.outcomes if o.acknowledged}
    sessions = {o.session for o in result.outcomes}
    deadline = time.monotonic() + 30
    while True:
        counts = _stored_turns(mesh, token, sessions)
        if counts is None:
            assert time.monotonic() < deadline, "memory never came back"
            time.sleep(0.5)
            continue
        lost = sorted(r for r in acknowledged if counts[r] < 2)
        doubled = sorted(r for r, n in counts.items() if n > 2)
        if not lost or time.monotonic() > deadline:
            return lost, doubled
        time.sleep(0.5)  # the gateway's outbox is still replaying


def _stored_usage(mesh: Mesh) -> Counter[str] | None:
    """Usage records per request id for the load's principal (the dev client), read from
    telemetry's own database; None while telemetry is not back."""
    principal = mesh.dev_credentials()["client_id"]
    try:
        with sqlite3.connect(f"file:{mesh.data_dir / 'telemetry.db'}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT request_id, COUNT(*) FROM telemetry_usage"
                " WHERE tenant = 'dev' AND principal = ? GROUP BY request_id",
                (principal,),
            ).fetchall()
    except sqlite3.OperationalError:
        return None
    return Counter(dict(rows))


def _usage_lost_or_doubled(mesh: Mesh, result: LoadResult) -> tuple[list[str], list[str]]:
    """Every acknowledged Run's usage record stored once (telemetry de-duplicates by request
    id; the gateways' outboxes may still be replaying after the fault)."""
    acknowledged = {o.request_id for o in result.outcomes if o.acknowledged}
    deadline = time.monotonic() + 40
    while True:
        counts = _stored_usage(mesh)
        lost = sorted(acknowledged - set(counts or ()))
        doubled = sorted(r for r, n in (counts or Counter()).items() if n > 1)
        if counts is not None and not lost:
            return lost, doubled
        if time.monotonic() > deadline:
            return lost, doubled
        time.sleep(0.5)


def _audit_chain_ok(mesh: Mesh, token: str) -> bool:
    with mesh.channel("gateway") as channel:
        verdict = gateway_pb2_grpc.GatewayStub(channel).VerifyAudit(
            gateway_pb2.VerifyAuditRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return bool(verdict.ok)


def _breaker_transitions(mesh: Mesh) -> int:
    return sum(
        1
        for name in ("gateway", "router")
        for record in mesh.log_records(name)
        if record.get("message") == "circuit breaker transition"
    )


def test_fault(scenario: Scenario, fault_mesh: FaultMesh) -> None:
    mesh = fault_mesh.mesh
    token = mesh.token()
    result = asyncio.run(_drive(fault_mesh, scenario, token))
    lost, doubled = _lost_or_doubled(mesh, token, result)
    usage_lost, usage_doubled = _usage_lost_or_doubled(mesh, result)
    audit_ok = _audit_chain_ok(mesh, token)
    row = {
        "scenario": scenario.name,
        "requests": len(result.outcomes),
        "answered": result.count("answered"),
        "degraded": result.count("degraded"),
        "refused": result.count("refused"),
        "failed": result.count("failed"),
        "p99_ms": round(result.p99_ms(), 1),
        "deadline_ms": int(scenario.deadline_s * 1000),
        "overruns": len(result.overruns()),
        "breaker_transitions": _breaker_transitions(mesh),
        "acknowledged": sum(1 for o in result.outcomes if o.acknowledged),
        "lost": len(lost),
        "doubled": len(doubled),
        "usage_lost": len(usage_lost),
        "usage_doubled": len(usage_doubled),
        "audit_chain": "ok" if audit_ok else "BROKEN",
        "codes": dict(Counter(o.code for o in result.outcomes)),
    }
    failures: list[str] = []
    if scenario.checks:
        figures, failures = scenario.checks(fault_mesh, result, token)
        row.update(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    assert result.outcomes, "the load sent nothing"
    assert not lost, f"acknowledged turns lost: {lost[:5]}"
    assert not doubled, f"turns stored twice: {doubled[:5]}"
    assert not usage_lost, f"acknowledged Runs without a usage record: {usage_lost[:5]}"
    assert not usage_doubled, f"usage recorded twice: {usage_doubled[:5]}"
    assert audit_ok, "the audit chain does not verify"
    assert not result.overruns(), f"requests outlived their deadline + 50 ms: {row}"
    if scenario.refusals_expected:
        assert row["refused"] > 0, row
        refused = [o for o in result.outcomes if o.kind == "refused"]
        slowest = max(o.latency_s for o in refused)
        bound = _refusal_bound_s(mesh, scenario)
        assert slowest < bound, f"refusals must come within the queue wait: {slowest} >= {bound}"
    else:
        assert row["failed"] == 0 and row["refused"] == 0, row
    assert not failures, f"{failures}: {row}"
