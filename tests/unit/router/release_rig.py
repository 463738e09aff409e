"""Real routers in-process (one or two replicas on one database) and a real telemetry service,
for the release tests. Releases are timed by an injected clock the test moves; the analyzers
tick in real time (every 20 ms) and act only when that clock says an analysis is due.

Traffic is simulated the way the gateway produces it: each call asks the router which version
serves its session (ResolveTool, the real assignment) and leaves the usage record the gateway
would (RecordUsage), stamped with the injected clock.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.channels import open_channel
from services.kit.db import create_engine, session_factory, sqlite_url
from services.kit.migrations import check_schema
from services.kit.server import Cleanup, Running, start
from services.router.app import build
from services.router.catalog import default_registry
from services.router.migrations import MIGRATIONS
from services.router.registry import Registry
from services.router.releases.model import UnitKey, UnitKind
from services.router.releases.store import ReleaseStore
from services.telemetry.app import build as build_telemetry
from services.telemetry.settings import TelemetrySettings
from tests.releases import tools
from tests.unit.router.harness import router_settings
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

PLATFORM = common_pb2.Caller(
    subject="root", tenant="ops", scopes=["admin", "platform:admin", "tools:read", "tools:write"]
)
TENANT_ADMIN = common_pb2.Caller(
    subject="alice", tenant="acme", scopes=["admin", "tools:read", "tools:write"]
)
ECHO = "echo_word"
GATEWAY = "toolmesh-gateway"
FAST = {
    "release_sync_s": 0.02,
    "release_tick_s": 0.02,
    "release_lease_s": 2.0,
    "prompt_cache_s": 0,
}


class Clock:
    """The releases' wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def registry(catalog: list[Any] | None = None) -> Registry:
    tools_registry = default_registry()
    for spec, run in tools.TOOLS if catalog is None else catalog:
        tools_registry.register(spec, run)
    return tools_registry


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


@dataclass
class Replica:
    running: Running
    stub: router_pb2_grpc.RouterStub
    channel: aio.Channel

    async def stop(self) -> None:
        await self.channel.close()
        await self.running.stop(0)


@dataclass
class Rig:
    root: Path
    database_url: str
    clock: Clock
    telemetry: telemetry_pb2_grpc.TelemetryStub
    telemetry_port: int
    replicas: list[Replica] = field(default_factory=list)
    _sessions: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def router(self) -> router_pb2_grpc.RouterStub:
        return self.replicas[0].stub

    async def add_replica(self, catalog: list[Any] | None = None, **overrides: Any) -> Replica:
        index = len(self.replicas)
        settings = router_settings(
            self.root / f"router-{index}-{uuid.uuid4().hex[:4]}",
            database_url=self.database_url,
            telemetry_target=f"127.0.0.1:{self.telemetry_port}",
            rules_file=tools.rules_with_release_tools(self.root),
            **{**FAST, **overrides},
        )
        cleanups: list[Cleanup] = []
        running = await start(
            settings,
            build(settings, cleanups, registry=registry(catalog), release_clock=self.clock),
        )
        running.cleanups.extend(cleanups)
        channel = open_channel(f"127.0.0.1:{running.port}")
        replica = Replica(running, router_pb2_grpc.RouterStub(channel), channel)
        self.replicas.append(replica)
        return replica

    # -- releases ---------------------------------------------------------------------------

    async def start_release(
        self,
        candidate: str,
        *,
        tool: str = ECHO,
        caller: common_pb2.Caller = PLATFORM,
        unit_kind: int = router_pb2.RELEASE_UNIT_KIND_TOOL,
        **plan: Any,
    ) -> router_pb2.Release:
        allow = plan.pop("allow_breaking", False)
        shared = plan.pop("shared", False)
        reply = await self.router.StartRelease(
            router_pb2.StartReleaseRequest(
                caller=caller,
                unit=router_pb2.ReleaseUnit(kind=unit_kind, name=tool),
                candidate_version=candidate,
                plan=router_pb2.ReleasePlan(**plan),
                allow_breaking=allow,
                shared=shared,
            ),
            timeout=10,
        )
        return reply.release

    async def release(self, release_id: str, stub: Any = None) -> router_pb2.Release:
        reply = await (stub or self.router).GetRelease(
            router_pb2.GetReleaseRequest(caller=PLATFORM, id=release_id), timeout=5
        )
        return reply.release

    async def control(
        self, release_id: str, action: int, reason: str = "test"
    ) -> router_pb2.Release:
        reply = await self.router.ControlRelease(
            router_pb2.ControlReleaseRequest(
                caller=PLATFORM, id=release_id, action=action, reason=reason
            ),
            timeout=5,
        )
        return reply.release

    async def until(
        self,
        release_id: str,
        done: Callable[[router_pb2.Release], bool],
        timeout: float = 10.0,
    ) -> router_pb2.Release:
        """Wait (real time) until the release satisfies ``done``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            release = await self.release(release_id)
            if done(release):
                return release
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"release never got there: {release}")
            await asyncio.sleep(0.02)

    async def interval(self, release_id: str, seconds: float) -> router_pb2.Release:
        """Move the clock one interval on and wait for the analysis it makes due."""
        before = len((await self.release(release_id)).events)
        self.clock.advance(seconds)
        return await self.until(release_id, lambda r: len(r.events) > before)

    # -- traffic ------------------------------------------------------------------------------

    async def resolve(
        self, session: str, *, tool: str = ECHO, stub: Any = None
    ) -> router_pb2.ToolContract:
        reply = await (stub or self.router).ResolveTool(
            router_pb2.ResolveToolRequest(
                caller=PLATFORM, tool_name=tool, allowed_tools=["*"], session_id=session
            ),
            timeout=5,
        )
        return reply.tool

    async def traffic(
        self,
        calls: int,
        behaviour: Callable[[str, int], tuple[bool, float]] = lambda _v, _i: (False, 10.0),
        *,
        tool: str = ECHO,
    ) -> Counter[str]:
        """``calls`` calls from new sessions: each resolved by the router and recorded as the
        gateway would; ``behaviour(version, n)`` says (failed, milliseconds) of the n-th call
        a version served."""
        served: Counter[str] = Counter()
        records = []
        for _ in range(calls):
            session = f"s{next(self._sessions)}"
            version = (await self.resolve(session, tool=tool)).version
            failed, ms = behaviour(version, served[version])
            served[version] += 1
            records.append(
                telemetry_pb2.UsageRecord(
                    request_id=uuid.uuid4().hex,
                    tenant=PLATFORM.tenant,
                    principal="load",
                    route="/toolmesh.gateway.v1.Gateway/CallTool",
                    service=GATEWAY,
                    tool_name=tool,
                    tool_version=version,
                    tool_calls=1,
                    occurred_at=stamp(self.clock.now),
                    outcome="fallback" if failed else "ok",
                    duration_ms=ms + 2,
                    tool_outcome=(
                        telemetry_pb2.TOOL_OUTCOME_FAILED
                        if failed
                        else telemetry_pb2.TOOL_OUTCOME_OK
                    ),
                    tool_duration_ms=ms,
                )
            )
        await self.telemetry.RecordUsage(telemetry_pb2.RecordUsageRequest(records=records))
        return served

    async def audit(self, action: str, tenant: str = "_platform") -> list[telemetry_pb2.AuditEvent]:
        caller = common_pb2.Caller(subject="auditor", tenant=tenant, scopes=["ops:read"])
        reply = await self.telemetry.ListAudit(
            telemetry_pb2.ListAuditRequest(caller=caller, action=action), timeout=5
        )
        return [stored.event for stored in reply.events]

    async def audit_all(self, tenant: str = "_platform") -> list[telemetry_pb2.AuditEvent]:
        return await self.audit("", tenant)

    async def eventually_shadowed(self, release_id: str, calls: int) -> None:
        """Wait until the replicas' shadow tallies of the release hold ``calls`` comparisons."""
        engine = create_engine(self.database_url)
        store = ReleaseStore(session_factory(engine))
        try:
            await eventually(lambda: _compared(store, release_id, calls))
        finally:
            await engine.dispose()

    @staticmethod
    async def settle() -> None:
        """Let several analyzer ticks and state refreshes pass (real time)."""
        await asyncio.sleep(0.2)


async def _compared(store: ReleaseStore, release_id: str, calls: int) -> bool:
    return (await store.shadow(release_id)).compared >= calls


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("never became true")
        await asyncio.sleep(0.02)


async def deployed_earlier(database_url: str, when: datetime) -> None:
    """The database as a first boot with only the 1.0.0 versions left it: those are stable
    (a later build's newer versions wait for a release)."""
    await check_schema(database_url, MIGRATIONS, migrate_on_start=True)
    engine = create_engine(database_url)
    try:
        store = ReleaseStore(session_factory(engine))
        for name in (ECHO, "release_mark"):
            await store.ensure_unit(UnitKey(UnitKind.TOOL, "", name), "1.0.0", by="boot", now=when)
    finally:
        await engine.dispose()


async def start_rig(
    root: Path, database_url: str = "", *, first_boot: bool = False
) -> AsyncIterator[Rig]:
    """Telemetry, and a router database where echo_word and release_mark 1.0.0 are stable
    (``first_boot``: a fresh one)."""
    telemetry_settings = TelemetrySettings(port=0, data_dir=root / "telemetry", metrics_port=0)
    cleanups: list[Cleanup] = []
    telemetry = await start(telemetry_settings, build_telemetry(telemetry_settings, cleanups))
    telemetry.cleanups.extend(cleanups)
    channel = open_channel(f"127.0.0.1:{telemetry.port}")
    rig = Rig(
        root=root,
        database_url=database_url or sqlite_url(root, "router"),
        clock=Clock(),
        telemetry=telemetry_pb2_grpc.TelemetryStub(channel),
        telemetry_port=telemetry.port,
    )
    if not first_boot:
        await deployed_earlier(rig.database_url, rig.clock.now)
    try:
        yield rig
    finally:
        for replica in reversed(rig.replicas):
            await replica.stop()
        await channel.close()
        await telemetry.stop(0)
