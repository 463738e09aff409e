"""The release drill: real processes (the five services, two router replicas, mutual TLS),
steady load through the gateway, a good release and bad ones, measured from the client's side.

The mesh first boots a build whose echo_word has only 1.0.0 (stable from then on), then rolls
out a build that also carries the candidates (tests.releases.tools): the new versions are served
only through releases. `make release-drill` runs it on SQLite and writes the figures into
docs/releases.md; tests/releases/test_release_mesh.py runs the same scenarios with assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from grpc import aio

from services.kit.db import create_engine, session_factory, sqlite_url
from services.kit.migrations import check_schema
from services.router.migrations import MIGRATIONS
from services.router.releases.model import UnitKey, UnitKind
from services.router.releases.store import ReleaseStore
from testing.mesh import Mesh
from tests.releases.tools import LOG_ENV, rules_with_release_tools
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

R = router_pb2
SYNC_S = 0.2
TICK_S = 0.2
LEASE_S = 1.5
INTERVAL_S = 1.0
THRESHOLD = 2
# What a release waits for its figures at most: the gateway's outbox delivers usage records
# within about its idle poll, telemetry answers at once.
RECORD_LAG_S = 1.0
STEPS = [20, 50, 100]
PLAN: dict[str, Any] = {
    "steps": STEPS,
    "interval_seconds": INTERVAL_S,
    "threshold": THRESHOLD,
    "min_requests": 10,
    "shadow_intervals": 1,
    "shadow_share": 0.5,
    "monitor_seconds": 2 * INTERVAL_S,
    # The machine is shared with other work: p95 jitters by tens of ms; +200 ms still fails.
    "p95_slack_ms": 50.0,
}
ACTIVE = {
    R.RELEASE_STATE_SHADOW,
    R.RELEASE_STATE_CANARY,
    R.RELEASE_STATE_PAUSED,
    R.RELEASE_STATE_MONITORING,
}
DOC = Path("docs/releases.md")
BEGIN = "<!-- drill:begin -->"
END = "<!-- drill:end -->"


def release_mesh(data_dir: Path, database_urls: dict[str, str] | None = None) -> Mesh:
    """The mesh with two router replicas, fast release settings and the first build."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Mesh(
        data_dir=data_dir,
        database_urls=database_urls or {},
        tls=True,
        replicas={"router": 2},
        extra_env={
            "TOOLMESH_ROUTER_PLUGIN_MODULES": "tests.releases.tools_v1",
            "TOOLMESH_ROUTER_RULES_FILE": str(rules_with_release_tools(data_dir)),
            "TOOLMESH_ROUTER_RELEASE_SYNC_S": str(SYNC_S),
            "TOOLMESH_ROUTER_RELEASE_TICK_S": str(TICK_S),
            "TOOLMESH_ROUTER_RELEASE_LEASE_S": str(LEASE_S),
            "TOOLMESH_GATEWAY_OUTBOX_IDLE_S": "0.1",
            LOG_ENV: str(data_dir / "marks.log"),
        },
    )


async def deployed_earlier(mesh: Mesh) -> None:
    """The router database as the first build's first boot left it (echo_word and
    release_mark 1.0.0 stable), so the mesh can start on the later build at once (the
    tests' shortcut; the drill deploys the later build for real)."""
    url = mesh.database_urls.get("router") or sqlite_url(mesh.data_dir, "router")
    await check_schema(url, MIGRATIONS, migrate_on_start=True)
    engine = create_engine(url)
    try:
        store = ReleaseStore(session_factory(engine))
        for name in ("echo_word", "release_mark"):
            await store.ensure_unit(
                UnitKey(UnitKind.TOOL, "", name), "1.0.0", by="first boot", now=datetime.now(UTC)
            )
    finally:
        await engine.dispose()
    mesh.extra_env["TOOLMESH_ROUTER_PLUGIN_MODULES"] = "tests.releases.tools"


def deploy_candidates(mesh: Mesh) -> None:
    """Roll out the build that carries the candidate versions, one router at a time."""
    mesh.extra_env["TOOLMESH_ROUTER_PLUGIN_MODULES"] = "tests.releases.tools"
    for name in mesh.instances("router"):
        mesh.stop(name)
        mesh.start(name)


@contextmanager
def running(mesh: Mesh) -> Iterator[Mesh]:
    """Every instance started at once once telemetry serves (the others wait for their
    dependencies on their own), and all stopped at once: a few seconds instead of one per
    process each way."""
    first, *others = mesh.all_instances()
    try:
        mesh.start(first)
        for name in others:
            mesh.spawn(name)
        for name in others:
            mesh.wait_serving(name, 60)
        yield mesh
    finally:
        for proc in mesh.procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in list(mesh.procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            mesh.procs.pop(name)


# -- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    # When the request was sent and answered (wall clock, seconds): a request is routed to a
    # version when it is sent.
    sent: float
    at: float
    version: str
    code: str
    outcome: int
    latency_ms: float


@dataclass
class Load:
    """Closed-loop Runs ("echo w<n>", a new session each: many short conversations)."""

    stub: gateway_pb2_grpc.GatewayStub
    metadata: tuple[tuple[str, str], ...]
    workers: int = 4
    prompt: str = "echo w{n}"
    answers: list[Answer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            n = next(self._counter)
            sent, started = time.time(), time.perf_counter()
            try:
                reply = await self.stub.Run(
                    gateway_pb2.RunRequest(session_id=f"load-{n}", prompt=self.prompt.format(n=n)),
                    metadata=self.metadata,
                    timeout=5,
                )
            except aio.AioRpcError as error:
                code = error.code()
                self.answers.append(
                    Answer(sent, time.time(), "", code.name if code else "UNKNOWN", 0, 0.0)
                )
                continue
            self.answers.append(
                Answer(
                    sent,
                    time.time(),
                    reply.tool_version,
                    "OK",
                    reply.outcome,
                    (time.perf_counter() - started) * 1000,
                )
            )
            await asyncio.sleep(0.01)

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if start <= a.at <= end]


# -- releases ---------------------------------------------------------------------------------


@dataclass
class Operator:
    stub: gateway_pb2_grpc.GatewayStub
    metadata: tuple[tuple[str, str], ...]

    async def start(self, candidate: str, *, tool: str = "echo_word", **plan: Any) -> R.Release:
        reply = await self.stub.StartRelease(
            gateway_pb2.StartReleaseRequest(
                unit=R.ReleaseUnit(kind=R.RELEASE_UNIT_KIND_TOOL, name=tool),
                candidate_version=candidate,
                plan=R.ReleasePlan(**plan),
                reason="release drill",
            ),
            metadata=self.metadata,
            timeout=15,
        )
        return reply.release

    async def get(self, release_id: str) -> R.Release:
        reply = await self.stub.GetRelease(
            gateway_pb2.GetReleaseRequest(id=release_id), metadata=self.metadata, timeout=5
        )
        return reply.release

    async def until(
        self, release_id: str, done: Callable[[R.Release], bool], timeout: float = 30.0
    ) -> R.Release:
        deadline = time.monotonic() + timeout
        while True:
            release = await self.get(release_id)
            if done(release):
                return release
            if time.monotonic() > deadline:
                raise TimeoutError(f"release {release_id} is still {release.state}: {release}")
            await asyncio.sleep(0.1)


def seconds(stamp: Any) -> float:
    return float(stamp.seconds) + stamp.nanos / 1e9


async def good_release(operator: Operator, load: Load, candidate: str = "1.1.0") -> dict[str, Any]:
    """Gates, shadow, every canary step, promotion and monitoring, under steady load."""
    started = time.time()
    release = await operator.start(candidate, **PLAN)
    done = await operator.until(release.id, lambda r: r.state not in ACTIVE, timeout=60)
    ended = time.time()
    answers = load.between(started, ended)
    shadow = next(
        (e.analysis for e in done.events if e.action == "step" and "shadow passed" in e.detail),
        None,
    )
    agreement = (
        next((f.agreement for f in shadow.figures if f.version == candidate), 0.0)
        if shadow
        else 0.0
    )
    return {
        "release": done.id,
        "state": R.ReleaseState.Name(done.state),
        "path": [
            f"{e.action}" + (f" {e.analysis.weight}%" if e.action == "step" else "")
            for e in done.events
            if e.action in ("gate", "step", "promote", "complete")
        ],
        "steps": [e.detail for e in done.events if e.action in ("step", "promote")],
        "duration_s": round(seconds(done.finished_at) - seconds(done.started_at), 2),
        "requests": len(answers),
        "served": dict(Counter(a.version for a in answers if a.code == "OK")),
        "failed": sum(1 for a in answers if a.code != "OK"),
        "shadow_agreement": agreement,
    }


def bound_s() -> float:
    """How long a bad candidate may serve after it starts failing, by the plan: an analysis
    may wait one interval for enough samples, then ``threshold`` failed analyses, then every
    replica applies the rollback within a sync and a tick, the records a second late at most."""
    return (THRESHOLD + 1) * INTERVAL_S + SYNC_S + TICK_S + RECORD_LAG_S


async def bad_release(
    operator: Operator,
    load: Load,
    candidate: str,
    bad: Callable[[Answer], bool],
) -> dict[str, Any]:
    """A candidate that misbehaves from its first call, rolled back by the analysis."""
    started = time.time()
    release = await operator.start(candidate, kind=R.RELEASE_PLAN_KIND_CANARY_ONLY, **PLAN)
    done = await operator.until(release.id, lambda r: r.state not in ACTIVE, timeout=30)
    decided = seconds(done.finished_at)
    # Keep the load on past every replica's next refresh, to see the candidate's last call.
    await asyncio.sleep(max(0.0, decided + 3 * SYNC_S + 1.0 - time.time()))
    ended = time.time()
    answers = load.between(started, ended)
    served = [a for a in answers if a.version == candidate]
    # From the first bad answer to the last request routed to the candidate.
    first_bad = min((a.at for a in served if bad(a)), default=started)
    last = max((a.sent for a in served), default=started)
    window = max(1e-3, decided - started)
    rate = sum(1 for a in answers if a.at <= decided) / window
    failed = [c for c in done.last_analysis.checks if not c.passed]
    return {
        "release": done.id,
        "candidate": candidate,
        "state": R.ReleaseState.Name(done.state),
        "reason": done.reason,
        "failed_checks": [f"{c.name}: {c.detail}" for c in failed],
        "time_to_zero_s": round(last - first_bad, 2),
        "decided_after_s": round(decided - first_bad, 2),
        "last_call_after_decision_s": round(last - decided, 2),
        "bound_s": round(bound_s(), 2),
        "candidate_calls": len(served),
        "candidate_calls_bound": int(STEPS[0] / 100 * rate * bound_s() * 1.5) + 5,
        "requests": len(answers),
        "rate_per_s": round(rate, 1),
        "failed_requests": sum(1 for a in answers if a.code != "OK"),
        # Requests sent once every replica has read the rollback.
        "served_after": dict(
            Counter(a.version for a in answers if a.sent > decided + SYNC_S + TICK_S)
        ),
    }


async def replica_names(mesh: Mesh) -> dict[str, str]:
    """Router replica id (as release leases name it) -> mesh instance, asked as the gateway."""
    names = {}
    for instance in mesh.instances("router"):
        credentials = mesh.credentials("gateway")
        async with aio.secure_channel(mesh.target(instance), credentials) as channel:
            info = await router_pb2_grpc.RouterStub(channel).GetServiceInfo(
                R.GetServiceInfoRequest(), timeout=5
            )
        names[info.info.attributes["replica"]] = instance
    return names


async def stable_echo(operator: Operator) -> str:
    """The echo_word version serving now (asked through a Run)."""
    reply = await operator.stub.Run(
        gateway_pb2.RunRequest(session_id="which", prompt="echo which"),
        metadata=operator.metadata,
        timeout=5,
    )
    return reply.tool_version


async def kill_the_analyzer(mesh: Mesh, operator: Operator, load: Load) -> dict[str, Any]:
    """kill -9 the router replica whose analyzer holds a release mid-canary: the other takes
    the lease once it expires and carries the release to its end from the database. The
    killed replica stays down (start it again with ``mesh.start``)."""
    # A good candidate whichever of the two good versions is stable now. Calls in flight on
    # the killed replica fail, whichever version they were on: a higher threshold keeps that
    # one bad interval from rolling back a good candidate.
    candidate = "1.0.0" if await stable_echo(operator) == "1.1.0" else "1.1.0"
    plan = {**PLAN, "steps": [25, 50, 75, 100], "threshold": 4}
    release = await operator.start(candidate, kind=R.RELEASE_PLAN_KIND_CANARY_ONLY, **plan)
    stepped = await operator.until(release.id, lambda r: r.step >= 1 and bool(r.analyzer))
    names = await replica_names(mesh)
    victim = names[stepped.analyzer]
    mesh.procs[victim].send_signal(signal.SIGKILL)
    mesh.procs[victim].wait(10)
    killed_at = time.time()
    await operator.until(release.id, lambda r: bool(r.analyzer) and r.analyzer != stepped.analyzer)
    taken_at = time.time()
    done = await operator.until(release.id, lambda r: r.state not in ACTIVE, timeout=60)
    mesh.procs.pop(victim)
    actors = {e.actor for e in done.events if e.actor.startswith("router ")}
    return {
        "release": done.id,
        "state": R.ReleaseState.Name(done.state),
        "reason": done.reason,
        "killed": victim,
        "killed_at_step": stepped.step,
        "taken_over_after_s": round(taken_at - killed_at, 2),
        "analyzers": sorted(actors),
        "judged_at": [e.analysis.weight for e in done.events if e.action == "step"],
        "double_steps": _double_steps(done),
    }


def _double_steps(release: R.Release) -> int:
    """Weights stepped to twice (two analyzers acting on one interval would do this)."""
    weights = Counter(e.analysis.weight for e in release.events if e.action == "step")
    return sum(count - 1 for count in weights.values() if count > 1)


def marks(mesh: Mesh) -> Counter[str]:
    path = mesh.data_dir / "marks.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[0] for line in lines)


async def write_canary(mesh: Mesh, operator: Operator, token: str) -> dict[str, Any]:
    """A canary of a write tool (never shadowed): each call runs once, retries included."""
    release = await operator.start(
        "1.1.0", tool="release_mark", steps=[50, 100], interval_seconds=30.0
    )
    stub = operator.stub
    metadata = (("authorization", f"Bearer {token}"),)
    served: Counter[str] = Counter()
    for i in range(30):
        for _ in range(2):  # the retry is answered from memory, never run again
            reply = await stub.Run(
                gateway_pb2.RunRequest(
                    session_id=f"mark-{i}", prompt=f"mark w{i}", idempotency_key=f"mark-key-{i}"
                ),
                metadata=metadata,
                timeout=5,
            )
        served[reply.tool_version] += 1
    await operator.stub.ControlRelease(
        gateway_pb2.ControlReleaseRequest(
            id=release.id, action=R.RELEASE_CONTROL_ABORT, reason="drill over"
        ),
        metadata=operator.metadata,
        timeout=5,
    )
    return {
        "plan": R.ReleasePlanKind.Name(release.plan.kind),
        "served": dict(served),
        "executions": sum(marks(mesh).values()),
        "runs_twice": sum(1 for count in marks(mesh).values() if count > 1),
    }


# -- the drill --------------------------------------------------------------------------------


async def drill(mesh: Mesh) -> dict[str, Any]:
    token = await asyncio.to_thread(mesh.token)
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.secure_channel(mesh.gateway, mesh.credentials()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        operator = Operator(stub, metadata)
        load = Load(stub, metadata)
        load.start()
        try:
            await asyncio.sleep(2.0)  # the stable version's baseline
            good = await good_release(operator, load)
            failing = await bad_release(
                operator, load, "1.2.0", lambda a: a.outcome == gateway_pb2.OUTCOME_FALLBACK
            )
            slow = await bad_release(operator, load, "1.3.0", lambda a: a.latency_ms >= 200)
        finally:
            await load.stop()
    return {"good": good, "failing": failing, "slow": slow, "load_workers": load.workers}


def write_doc(results: dict[str, Any], doc: Path = DOC) -> None:
    good, failing, slow = results["good"], results["failing"], results["slow"]
    rows = [
        "| release | result | time from first bad answer to 0% candidate | bound | calls "
        "served by the candidate | bound | requests failed by the rollback |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bad in (("1.2.0 fails 1 call in 5", failing), ("1.3.0 adds 200 ms", slow)):
        rows.append(
            f"| {name} | {bad['state'].removeprefix('RELEASE_STATE_').lower()} | "
            f"{bad['time_to_zero_s']} s | {bad['bound_s']} s | {bad['candidate_calls']} of "
            f"{bad['requests']} | {bad['candidate_calls_bound']} | {bad['failed_requests']} |"
        )
    block = "\n".join(
        [
            BEGIN,
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make release-drill` on this "
            "2-core machine: the five services as real processes with mutual TLS, two router "
            f"replicas, SQLite, {results['load_workers']} closed-loop clients sending Run "
            f"through the gateway (about {failing['rate_per_s']} requests/s), plan steps "
            f"{', '.join(f'{s}%' for s in STEPS)}, interval {INTERVAL_S:g} s, threshold "
            f"{THRESHOLD}, p95 slack {PLAN['p95_slack_ms']:g} ms, replicas re-reading the "
            f"release state every {SYNC_S:g} s.",
            "",
            f"Good candidate (echo_word 1.1.0 against 1.0.0): "
            f"{good['state'].removeprefix('RELEASE_STATE_').lower()} in {good['duration_s']} s "
            f"through {' -> '.join(good['path'])} (a step's weight is the one it was judged "
            f"at); shadow agreement {good['shadow_agreement']:.0%}; {good['requests']} requests "
            f"during the release, served by "
            + ", ".join(f"{v}: {n}" for v, n in sorted(good["served"].items()))
            + f"; {good['failed']} failed.",
            "",
            *rows,
            "",
            "Bound on the time: (threshold + 1) x interval (one interval may wait for samples) "
            "+ release_sync_s + release_tick_s + 1 s for the usage records to reach telemetry. "
            "Bound on the calls: the first step's weight x the measured request rate x that "
            "time x 1.5, + 5.",
            "",
            "Decided after the first bad answer / last request routed to the candidate after "
            f"the decision: failing {failing['decided_after_s']} s / "
            f"{failing['last_call_after_decision_s']} s, slow {slow['decided_after_s']} s / "
            f"{slow['last_call_after_decision_s']} s (negative: sent before the decision).",
            "",
            f"Failed checks of the failing candidate: {'; '.join(failing['failed_checks'])}.",
            f"Failed checks of the slow candidate: {'; '.join(slow['failed_checks'])}.",
            END,
        ]
    )
    text = doc.read_text()
    doc.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :])
    print(f"wrote the drill's figures to {doc}")


def main() -> int:
    root = Path(os.environ.get("TOOLMESH_DRILL_DIR", "var/release-drill"))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    mesh = release_mesh(root / stamp)
    with running(mesh):
        deploy_candidates(mesh)
        results = asyncio.run(drill(mesh))
    print(json.dumps(results, indent=2))
    write_doc(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
