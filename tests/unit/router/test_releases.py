"""Releases against real routers (in-process, one or two replicas on one database) and a real
telemetry service, on SQLite and PostgreSQL; release time is an injected clock."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from services.kit.db import create_engine, session_factory
from services.router.models.prompts import PromptStore
from tests.releases import tools
from tests.unit.router.release_rig import (
    ECHO,
    PLATFORM,
    TENANT_ADMIN,
    Rig,
    eventually,
    start_rig,
)
from toolmesh.router.v1 import router_pb2

R = router_pb2
INTERVAL = 1.0
QUICK = {
    "steps": [20, 50, 100],
    "interval_seconds": INTERVAL,
    "threshold": 2,
    "min_requests": 10,
    "shadow_intervals": 1,
    "shadow_share": 1.0,
    "monitor_seconds": 2 * INTERVAL,
}


@pytest.fixture(params=["sqlite", "postgres"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    async for started in start_rig(tmp_path, url):
        yield started


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[Rig]:
    """SQLite only, one replica with every test version registered."""
    async for started in start_rig(tmp_path):
        await started.add_replica()
        yield started


def refusals(error: aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    found = {}
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            found |= {v.subject: v.description for v in failure.violations}
    return found


async def test_first_boot_serves_the_latest_and_a_new_version_waits_for_a_release(
    tmp_path: Path,
) -> None:
    async for rig in start_rig(tmp_path, first_boot=True):
        first = await rig.add_replica(tools.STABLE_ONLY)
        assert (await rig.resolve("s1")).version == "1.0.0"
        await first.stop()
        rig.replicas.clear()
        # A new build ships 1.1.0 .. 2.0.0: the persisted stable version keeps serving.
        await rig.add_replica()
        assert (await rig.resolve("s1")).version == "1.0.0"
        listed = await rig.router.ListTools(R.ListToolsRequest(caller=PLATFORM), timeout=5)
        assert {t.version for t in listed.tools if t.name == ECHO} == {"1.0.0"}
        # Calculator was never released: its latest is stable since the first boot.
        calc = await rig.resolve("s1", tool="calculator")
        assert calc.version == "1.1.0"
        # The operator's explicit promotion (audited by the gateway) serves it at once.
        done = await rig.router.StartRelease(
            R.StartReleaseRequest(
                caller=PLATFORM,
                unit=R.ReleaseUnit(kind=R.RELEASE_UNIT_KIND_TOOL, name=ECHO),
                candidate_version="1.1.0",
                plan=R.ReleasePlan(kind=R.RELEASE_PLAN_KIND_IMMEDIATE, monitor_seconds=0),
            ),
            timeout=10,
        )
        assert done.release.state == R.RELEASE_STATE_SUCCEEDED
        assert (await rig.resolve("s1")).version == "1.1.0"


async def test_a_good_candidate_is_shadowed_stepped_promoted_and_monitored(rig: Rig) -> None:
    await rig.add_replica()
    release = await rig.start_release("1.1.0", **QUICK)
    assert release.state == R.RELEASE_STATE_SHADOW and release.weight == 0
    assert [(g.name, g.passed) for g in release.gates] == [
        ("contract", True),
        ("drift", True),
        ("examples", True),
    ]
    # Shadow: live calls answered by 1.0.0 are copied to 1.1.0 after their answer.
    for i in range(12):
        reply = await rig.router.InvokeTool(
            R.InvokeToolRequest(
                caller=PLATFORM,
                request_id=f"r{i}",
                tool_name=ECHO,
                tool_version="1.0.0",
                arguments_json=json.dumps({"word": f"w{i}"}),
                allowed_tools=["*"],
            ),
            timeout=5,
        )
        assert reply.tool_version == "1.0.0"  # the answer is always the stable one's
    await rig.eventually_shadowed(release.id, 12)
    after_shadow = await rig.interval(release.id, INTERVAL)
    assert after_shadow.state == R.RELEASE_STATE_CANARY and after_shadow.weight == 20
    shadow = after_shadow.events[-1].analysis
    candidate = next(f for f in shadow.figures if f.version == "1.1.0")
    assert candidate.source == "shadow" and candidate.requests == 12 and candidate.agreement == 1
    # Canary steps under steady (simulated) load: 20% -> 50% -> 100% -> promoted.
    weights = []
    for _ in range(3):
        served = await rig.traffic(60)
        assert served["1.1.0"] > 0
        current = await rig.interval(release.id, INTERVAL)
        weights.append((current.state, current.weight))
    assert weights == [
        (R.RELEASE_STATE_CANARY, 50),
        (R.RELEASE_STATE_CANARY, 100),
        (R.RELEASE_STATE_MONITORING, 100),
    ]
    assert (await rig.resolve("fresh-session")).version == "1.1.0"
    # Monitoring: the SLO holds for the window, then the release completes.
    await rig.traffic(30)
    await rig.interval(release.id, INTERVAL)
    await rig.traffic(30)
    done = await rig.interval(release.id, INTERVAL)
    assert done.state == R.RELEASE_STATE_SUCCEEDED
    actions = [e.action for e in done.events]
    assert actions[:2] == ["start", "gate"]
    assert actions.count("step") == 3 and "promote" in actions and actions[-1] == "complete"

    # Every transition the analyzer decided is in the platform's audit trail, with figures.
    async def audited() -> bool:
        names = [e.action for e in await rig.audit_all()]
        return names.count("release.step") == 3 and "release.complete" in names

    await eventually(audited)
    promote = (await rig.audit("release.promote"))[0]
    assert json.loads(promote.details_json)["candidate"] == "1.1.0"


@pytest.mark.parametrize(
    ("candidate", "behaviour", "failed_check"),
    [
        # One call in five fails.
        ("1.2.0", lambda v, n: (v == "1.2.0" and n % 5 == 4, 10.0), "error_rate"),
        # 200 ms slower.
        ("1.3.0", lambda v, n: (False, 210.0 if v == "1.3.0" else 10.0), "p95_latency"),
    ],
)
async def test_a_bad_candidate_is_rolled_back_automatically(
    lite: Rig, candidate: str, behaviour: object, failed_check: str
) -> None:
    rig = lite
    plan = {**QUICK, "kind": R.RELEASE_PLAN_KIND_CANARY_ONLY}
    release = await rig.start_release(candidate, **plan)
    assert release.state == R.RELEASE_STATE_CANARY and release.weight == 20
    served: Counter[str] = Counter()
    for _ in range(plan["threshold"]):
        served += await rig.traffic(60, behaviour)  # type: ignore[arg-type]
        current = await rig.interval(release.id, INTERVAL)
        failed = [c.name for c in current.events[-1].analysis.checks if not c.passed]
        assert failed_check in failed
    assert current.state == R.RELEASE_STATE_ROLLED_BACK and current.weight == 0
    assert f"{plan['threshold']} failed analyses" in current.reason
    # It stayed at its first weight (a failed analysis halts advancement)...
    assert 0 < served[candidate] < 60 * plan["threshold"] * 0.35
    # ...and once rolled back no session reaches it.
    after = await rig.traffic(50)
    assert set(after) == {"1.0.0"}
    # The audit event reaches telemetry through the router's outbox, a moment later.
    await eventually(lambda: _has_audit(rig, "release.rollback"))
    rollback = await rig.audit("release.rollback")
    assert failed_check in rollback[0].details_json


async def test_refused_gates_say_which_check_failed_and_why(lite: Rig) -> None:
    rig = lite
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("2.0.0")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    why = refusals(caught.value)
    assert set(why) == {"contract"}
    assert "adds required input 'lang'" in why["contract"] and "--allow-breaking" in why["contract"]
    release_id = caught.value.details().split()[1]
    refused = await rig.release(release_id)
    assert refused.state == R.RELEASE_STATE_REFUSED and refused.weight == 0
    # A failing example.
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("1.4.0")
    assert "examples" in refusals(caught.value)
    assert 'expected result word = "apple", got "APPLE"' in refusals(caught.value)["examples"]
    # A breaking change with a new major version and the operator's consent passes.
    accepted = await rig.start_release(
        "2.0.0", allow_breaking=True, kind=R.RELEASE_PLAN_KIND_CANARY_ONLY
    )
    assert accepted.state == R.RELEASE_STATE_CANARY
    assert "accepted" in accepted.gates[0].detail
    # One release per unit at a time.
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("1.1.0")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert accepted.id in caught.value.details()

    async def gate_audited() -> bool:
        events = await rig.audit("release.gate")
        return release_id in {json.loads(e.details_json)["release"] for e in events}

    # The refusal is audited through the router's outbox, a moment later.
    await eventually(gate_audited)


async def test_a_write_tool_is_never_shadowed_and_its_canary_runs_each_call_once(
    lite: Rig,
) -> None:
    rig = lite
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release(
            "1.1.0", tool="release_mark", kind=R.RELEASE_PLAN_KIND_SHADOW_THEN_CANARY
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a write tool is never shadowed" in caught.value.details()
    # Without a plan, a write tool gets the canary only.
    release = await rig.start_release("1.1.0", tool="release_mark", steps=[50, 100])
    assert release.plan.kind == R.RELEASE_PLAN_KIND_CANARY_ONLY and release.weight == 50
    tools.CALLS.clear()
    versions: Counter[str] = Counter()
    for i in range(40):
        contract = await rig.resolve(f"w{i}", tool="release_mark")
        versions[contract.version] += 1
        for _ in range(2):  # a retry with the same key writes nothing more
            await rig.router.InvokeTool(
                R.InvokeToolRequest(
                    caller=PLATFORM,
                    request_id=f"w{i}",
                    session_id=f"w{i}",
                    tool_name="release_mark",
                    tool_version=contract.version,
                    arguments_json=json.dumps({"word": f"w{i}"}),
                    idempotency_key=f"key-{i}",
                    allowed_tools=["*"],
                ),
                timeout=5,
            )
    assert versions["1.0.0"] and versions["1.1.0"]
    # release_mark itself keeps no idempotency: every execution is in CALLS, none twice
    # because of the release (a shadow never copies it), the retries each ran once more.
    assert Counter(CALL.split()[0] for CALL in tools.CALLS) == {f"key-{i}": 2 for i in range(40)}


async def test_operators_pause_resume_promote_and_abort(lite: Rig) -> None:
    rig = lite
    release = await rig.start_release(
        "1.1.0", kind=R.RELEASE_PLAN_KIND_CANARY_ONLY, steps=[30, 100]
    )
    paused = await rig.control(release.id, R.RELEASE_CONTROL_PAUSE, "look at the logs")
    assert paused.state == R.RELEASE_STATE_PAUSED and paused.weight == 30
    assert paused.paused_state == R.RELEASE_STATE_CANARY
    await rig.traffic(40)
    rig.clock.advance(5 * INTERVAL)
    await rig.settle()
    assert (await rig.release(release.id)).events[-1].action == "pause"  # no analysis ran
    assert {"1.0.0", "1.1.0"} <= set(await rig.traffic(60))  # the weight stays
    resumed = await rig.control(release.id, R.RELEASE_CONTROL_RESUME)
    assert resumed.state == R.RELEASE_STATE_CANARY
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.control(release.id, R.RELEASE_CONTROL_ABORT, reason="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    aborted = await rig.control(release.id, R.RELEASE_CONTROL_ABORT, "wrong build")
    assert aborted.state == R.RELEASE_STATE_ABORTED and aborted.weight == 0
    assert set(await rig.traffic(40)) == {"1.0.0"}
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.control(release.id, R.RELEASE_CONTROL_RESUME)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A manual promotion, then an abort while monitoring rolls back to the previous version.
    second = await rig.start_release("1.1.0", kind=R.RELEASE_PLAN_KIND_CANARY_ONLY)
    promoted = await rig.control(second.id, R.RELEASE_CONTROL_PROMOTE, "verified by hand")
    assert promoted.state == R.RELEASE_STATE_MONITORING
    assert (await rig.resolve("anyone")).version == "1.1.0"
    back = await rig.control(second.id, R.RELEASE_CONTROL_ABORT, "customers complain")
    assert back.state == R.RELEASE_STATE_ABORTED
    assert (await rig.resolve("anyone")).version == "1.0.0"


async def test_releases_of_platform_units_need_the_platform_operator(lite: Rig) -> None:
    rig = lite
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("1.1.0", caller=TENANT_ADMIN)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    release = await rig.start_release("1.1.0", kind=R.RELEASE_PLAN_KIND_CANARY_ONLY)
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.router.GetRelease(R.GetReleaseRequest(caller=TENANT_ADMIN, id=release.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await rig.router.ListReleases(R.ListReleasesRequest(caller=TENANT_ADMIN))
    assert not listed.releases
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("1.1.0", tool="nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("1.0.0", tool=ECHO)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_two_replicas_apply_one_state_and_only_one_analyzer_acts(rig: Rig) -> None:
    first = await rig.add_replica()
    second = await rig.add_replica()
    release = await rig.start_release("1.1.0", **{**QUICK, "kind": R.RELEASE_PLAN_KIND_CANARY_ONLY})
    # The same sessions get the same versions from either replica.
    sessions = [f"x{i}" for i in range(60)]
    seen = [
        [(await rig.resolve(s, stub=replica.stub)).version for s in sessions]
        for replica in (first, second)
    ]
    assert seen[0] == seen[1] and set(seen[0]) == {"1.0.0", "1.1.0"}
    await rig.traffic(60)
    stepped = await rig.interval(release.id, INTERVAL)
    holder = stepped.analyzer
    assert stepped.weight == 50 and holder
    # Each interval is judged once, whichever replica holds the lease.
    await rig.traffic(60)
    await rig.interval(release.id, INTERVAL)
    await rig.settle()
    current = await rig.release(release.id)
    analyses = [e for e in current.events if e.analysis.checks]
    assert len(analyses) == 2 and {e.actor for e in analyses} == {f"router {holder}"}
    # The holder stops (a clean stop lets the lease go): the other carries on from the DB.
    names = {}
    for replica in (first, second):
        info = await replica.stub.GetServiceInfo(R.GetServiceInfoRequest(), timeout=5)
        names[info.info.attributes["replica"]] = replica
    owner = names[holder]
    await owner.stop()
    rig.replicas.remove(owner)
    await rig.traffic(60)
    promoted = await rig.interval(release.id, INTERVAL)
    assert promoted.state == R.RELEASE_STATE_MONITORING, promoted.events[-1]
    assert promoted.analyzer and promoted.analyzer != holder
    assert promoted.events[-1].actor == f"router {promoted.analyzer}"


async def test_a_prompt_release_assigns_the_candidate_per_session(lite: Rig) -> None:
    rig = lite
    published = await rig.router.PublishPrompt(
        R.PublishPromptRequest(
            caller=TENANT_ADMIN,
            name="answer",
            template="Answer briefly from $tool_name's result.",
            keep_selection=True,
        ),
        timeout=5,
    )
    candidate = published.version.ref.version
    assert not published.version.selected
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.router.StartRelease(
            R.StartReleaseRequest(
                caller=TENANT_ADMIN,
                unit=R.ReleaseUnit(kind=R.RELEASE_UNIT_KIND_PROMPT, name="answer"),
                candidate_version=str(candidate),
                plan=R.ReleasePlan(kind=R.RELEASE_PLAN_KIND_SHADOW_THEN_CANARY),
            ),
            timeout=5,
        )
    assert "a prompt is never shadowed" in caught.value.details()
    started = await rig.router.StartRelease(
        R.StartReleaseRequest(
            caller=TENANT_ADMIN,
            unit=R.ReleaseUnit(kind=R.RELEASE_UNIT_KIND_PROMPT, name="answer"),
            candidate_version=str(candidate),
            plan=R.ReleasePlan(steps=[50, 100]),
        ),
        timeout=5,
    )
    release = started.release
    assert release.unit.tenant == "acme" and release.weight == 50
    # The selection can only change through the release now.
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.router.SelectPrompt(
            R.SelectPromptRequest(caller=TENANT_ADMIN, name="answer", version=1), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    engine = create_engine(rig.database_url)
    try:
        store = PromptStore(session_factory(engine), cache_s=0)
        picked = Counter(
            [(await store.selected("acme", "answer", f"s{i}")).version for i in range(200)]
        )
        assert set(picked) == {int(release.stable_version), candidate}
        again = [(await store.selected("acme", "answer", f"s{i}")).version for i in range(20)]
        assert again == [
            (await store.selected("acme", "answer", f"s{i}")).version for i in range(20)
        ]
        # Another tenant is not in this release.
        assert {(await store.selected("globex", "answer", f"s{i}")).version for i in range(50)} == {
            int(release.stable_version)
        }
        await rig.control(release.id, R.RELEASE_CONTROL_ABORT, "not now")
        assert {(await store.selected("acme", "answer", f"s{i}")).version for i in range(50)} == {
            int(release.stable_version)
        }
    finally:
        await engine.dispose()


def _rules_version(rig: Rig, version: str, extra: str) -> None:
    """A rules version in the rig's rules directory: the seed with its own version."""
    seed = tools.rules_with_release_tools(rig.root).read_text()
    head, _, tail = seed.partition('version = "2026.11.29-1"')
    directory = rig.root / "rules.d"
    directory.mkdir(exist_ok=True)
    (directory / f"{version}.toml").write_text(f'{head}version = "{version}"{tail}{extra}')


@pytest.fixture
async def rules_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """One replica with two more routing rules versions beside the seed: a good one and one
    whose examples fail."""
    async for started in start_rig(tmp_path):
        _rules_version(
            started,
            "2026.12.04-1",
            '\n[[examples]]\nprompt = "echo apple"\ntool = "echo_word"\n'
            'arguments = { word = "apple" }\n\n[[examples]]\nprompt = "tell me a joke"\n',
        )
        _rules_version(
            started, "2026.12.04-2", '\n[[examples]]\nprompt = "echo apple"\ntool = "calculator"\n'
        )
        await started.add_replica(rules_dir=started.root / "rules.d")
        yield started


async def test_a_routing_rules_version_is_gated_shadowed_and_canaried(rules_rig: Rig) -> None:
    rig = rules_rig

    async def route(session: str, prompt: str = "echo apple") -> R.RouteResponse:
        return await rig.router.Route(
            R.RouteRequest(caller=PLATFORM, prompt=prompt, allowed_tools=["*"], session_id=session),
            timeout=5,
        )

    assert (await route("a")).rules_version == "2026.11.29-1"
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("2026.12.04-2", tool="", unit_kind=R.RELEASE_UNIT_KIND_ROUTING)
    why = refusals(caught.value)["examples"]
    assert "expected calculator, got echo_word" in why
    with pytest.raises(aio.AioRpcError) as caught:
        await rig.start_release("2026.99.99-1", tool="", unit_kind=R.RELEASE_UNIT_KIND_ROUTING)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    release = await rig.start_release(
        "2026.12.04-1",
        tool="",
        unit_kind=R.RELEASE_UNIT_KIND_ROUTING,
        **{**QUICK, "min_requests": 5},
    )
    assert release.state == R.RELEASE_STATE_SHADOW
    for i in range(8):
        routed = await route(f"shadow-{i}", f"echo w{i}")
        assert routed.rules_version == "2026.11.29-1"
    await rig.eventually_shadowed(release.id, 8)
    canary = await rig.interval(release.id, INTERVAL)
    assert canary.state == R.RELEASE_STATE_CANARY and canary.weight == 20
    agreement = next(
        f for f in canary.events[-1].analysis.figures if f.version == "2026.12.04-1"
    ).agreement
    assert agreement == 1.0
    versions = Counter([(await route(f"c{i}")).rules_version for i in range(100)])
    assert set(versions) == {"2026.11.29-1", "2026.12.04-1"}
    # A conversation keeps its rules version.
    assert len({(await route("c7")).rules_version for _ in range(5)}) == 1
    await rig.control(release.id, R.RELEASE_CONTROL_PROMOTE, "looks right")
    assert {(await route(f"d{i}")).rules_version for i in range(20)} == {"2026.12.04-1"}


async def test_a_breach_after_promotion_rolls_back_to_the_previous_version(lite: Rig) -> None:
    rig = lite
    release = await rig.start_release(
        "1.1.0",
        kind=R.RELEASE_PLAN_KIND_IMMEDIATE,
        monitor_seconds=60,
        **{"interval_seconds": INTERVAL, "min_requests": 10, "threshold": 2},
    )
    assert release.state == R.RELEASE_STATE_MONITORING
    assert (await rig.resolve("anyone")).version == "1.1.0"
    # The promoted version now fails every third call: its error budget burns far too fast.
    for _ in range(2):
        await rig.traffic(30, lambda v, n: (v == "1.1.0" and n % 3 == 0, 10.0))
        current = await rig.interval(release.id, INTERVAL)
    assert current.state == R.RELEASE_STATE_FAILED, current.events[-1]
    assert "the SLO was breached after promotion" in current.reason
    assert "slo_availability" in current.reason

    async def rolled_back() -> bool:
        return (await rig.resolve("anyone")).version == "1.0.0"

    # Every replica follows the failed release back to 1.0.0 at its next look at the state.
    await eventually(rolled_back)
    # The audit event reaches telemetry through the router's outbox, a moment later.
    await eventually(lambda: _has_audit(rig, "release.fail"))
    failed = await rig.audit("release.fail")
    assert json.loads(failed[0].details_json)["candidate"] == "1.1.0"


async def _has_audit(rig: Rig, action: str) -> bool:
    return bool(await rig.audit(action))
