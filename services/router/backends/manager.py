"""Backends at run time: one supervised connection per backend on every replica, discovery,
drift, and the tools each tenant may see.

Every ``sync_s`` seconds (and at once after a change this replica made) the manager reads the
backend table and starts or stops connections to match it, so a backend registered or removed
through any replica is served or stopped by all of them within that bound. Each backend has a
supervisor task that opens a session (an MCP stdio server is started as this replica's own
child process), discovers its tools, re-discovers every ``discovery_s`` seconds, and reconnects
with exponential backoff and jitter when the session fails (at once, the first time, after a
session that worked: a crashed stdio server is restarted immediately).

Serving rule for a drifted tool (a backend now describes it differently than its published
version): the published (pinned) contract keeps being served, so calls are validated against
the pinned input and output schemas and callers only ever see the pinned description; the new
contract waits as PENDING for an operator. One exception: when the backend now declares a
write side effect for a tool published as read-only, the tool is suspended (FAILED_PRECONDITION)
until approved, since serving it as read-only would let a read-only caller write.

Which published version is pinned is the release state's (services.router.releases): the
tool's stable version. An approved version is published beside it and reaches callers only
through a release (docs/releases.md). Every published version stays runnable, so a call
routed to a candidate just before a rollback still completes; a version is retired when the
release that replaced it completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import grpc
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.audit import FAILURE, AuditAction, audit_event, clean, derived_event_id
from services.kit.metrics import meter
from services.router.audit import RouterAudit
from services.router.backends.clients import (
    BackendFault,
    CallOutcome,
    RawTool,
    Session,
    connector,
)
from services.router.backends.config import BackendRecord, Kind
from services.router.backends.contracts import (
    MAX_DESCRIPTION_CHARS,
    MAX_SCHEMA_CHARS,
    TOOL_NAME,
    DiscoveredTool,
    changed_fields,
    side_effect_of,
)
from services.router.backends.network import CommandPolicy, HostPolicy
from services.router.backends.store import BackendStore, Drift, VersionRecord, VersionState
from services.router.invoke import ToolRunError
from services.router.registry import (
    SideEffect,
    Tool,
    ToolContext,
    ToolOrigin,
    ToolOutput,
    ToolSpec,
)
from toolmesh.router.v1 import router_pb2

log = logging.getLogger("toolmesh.router.backends")

CONNECTING = router_pb2.BACKEND_STATE_CONNECTING
READY = router_pb2.BACKEND_STATE_READY
DRIFTED = router_pb2.BACKEND_STATE_DRIFTED
FAILING = router_pb2.BACKEND_STATE_FAILING

# What a tool is on this replica (the toolmesh.router.backend.tools gauge's "status").
SERVED = "served"
DRIFTED_SERVED = "drifted"
SUSPENDED = "suspended"
MISSING = "missing"


@dataclass(frozen=True)
class ManagerSettings:
    sync_s: float
    discovery_s: float
    timeout_ms: int
    max_concurrency: int
    backoff_min_s: float
    backoff_max_s: float
    stderr_lines_per_s: float


def _validator(schema: Any) -> Validator:
    cls = validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    validator: Validator = cls(schema)
    return validator


class BackendRuntime:
    """One backend on this replica: its supervisor task, session, tools and state."""

    def __init__(self, record: BackendRecord, manager: BackendManager) -> None:
        self.record = record
        self._manager = manager
        self._state: router_pb2.BackendState = CONNECTING
        # Set (and replaced) at every change of state or session, for calls waiting on one.
        self._changed = asyncio.Event()
        self.last_error = ""
        self.last_discovery_at: datetime | None = None
        # tool -> its versions (oldest first), from the database.
        self.versions: dict[str, list[VersionRecord]] = {}
        # What the last discovery on this replica found (None: no discovery yet).
        self.live: dict[str, DiscoveredTool] | None = None
        # tool -> the Tool served for it by default (its stable version).
        self.tools: dict[str, Tool] = {}
        # tool -> version -> the Tool of every published version (releases pick among them).
        self.published: dict[str, dict[str, Tool]] = {}
        # tool -> served, drifted, suspended or missing.
        self.status: dict[str, str] = {}
        self.restarts = 0
        self._session: Session | None = None
        # Calls in flight on the current session; cut short when the session ends.
        self._inflight: set[asyncio.Future[CallOutcome]] = set()
        self._severed: set[asyncio.Future[CallOutcome]] = set()
        self._wake = asyncio.Event()
        self._broken = ""
        self._task: asyncio.Task[None] | None = None
        self._discovered = asyncio.Event()

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> router_pb2.BackendState:
        return self._state

    @state.setter
    def state(self, value: router_pb2.BackendState) -> None:
        self._state = value
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def label(self) -> str:
        return self.record.label

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"backend:{self.label}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def first_discovery(self, timeout_s: float) -> None:
        """Wait until the first connection attempt ended (discovered or failed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0)):
                await self._discovered.wait()

    def mark_broken(self, reason: str) -> None:
        """The session is gone (a call saw it, or the stdio server exited): reconnect now."""
        if self._session is None and self._broken:
            return
        self._broken = reason
        # New calls wait for the next session instead of trying this one.
        self._session = None
        if self.state in (READY, DRIFTED):
            self.state = CONNECTING
        self._wake.set()

    def _connector(self) -> Any:
        settings = self._manager.settings
        executable = ""
        if self.record.config.kind is Kind.MCP_STDIO:
            try:
                executable = self._manager.commands.resolve(self.record.config.command[0])
            except ValueError as error:
                raise BackendFault(grpc.StatusCode.UNAVAILABLE, f"command {error}") from None
        made = connector(
            self.record.config,
            self.label,
            executable=executable,
            policy=self._manager.hosts,
            stderr_lines_per_s=settings.stderr_lines_per_s,
        )
        made.died.clear()
        return made

    async def _supervise(self) -> None:
        failures = 0
        worked = False
        while True:
            self._broken = ""
            self._wake.clear()
            try:
                made = self._connector()
                async with made.open() as session:
                    await self._discover(session)
                    self._session = session
                    self._pulse()
                    failures, worked = 0, True
                    while True:
                        await self._sleep_until_woken(made.died)
                        if made.died.is_set():
                            raise BackendFault(
                                grpc.StatusCode.UNAVAILABLE, "the server process exited"
                            )
                        if self._broken:
                            raise BackendFault(grpc.StatusCode.UNAVAILABLE, self._broken)
                        await self._discover(session)
            except asyncio.CancelledError:
                raise
            except BackendFault as fault:
                reason = fault.message
            except BaseException as error:  # an ExceptionGroup from the transport's tasks
                reason = _describe(error)
            finally:
                self._session = None
                self._sever()
                self._discovered.set()
            failures += 1
            immediate = worked and failures == 1
            self.state = CONNECTING if immediate else FAILING
            self.last_error = clean(reason, 500)
            if worked:
                self.restarts += 1
                _RESTARTS.add(1, self._manager.metric_labels(self))
            worked = False
            delay = 0.0 if immediate else self._manager.backoff_s(failures)
            log.warning(
                "backend connection failed; reconnecting",
                extra={"backend": self.label, "reason": self.last_error, "retry_in_s": delay},
            )
            await asyncio.sleep(delay)

    def _sever(self) -> None:
        """The session ended: calls still waiting on it fail now (UNAVAILABLE), not at their
        deadline (a transport that died may never answer them)."""
        for call in self._inflight:
            if not call.done():
                self._severed.add(call)
                call.cancel()

    async def _session_for_call(self) -> Session:
        """The open session; while (re)connecting, wait for it (within the call's budget);
        while failing, UNAVAILABLE at once."""
        while True:
            if self._session is not None:
                return self._session
            if self.state == FAILING:
                raise ToolRunError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"backend {self.name} is unavailable (reconnecting in the background)",
                )
            await self._changed.wait()

    async def _sleep_until_woken(self, died: asyncio.Event) -> None:
        waits = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(died.wait()),
        ]
        try:
            await asyncio.wait(
                waits,
                timeout=self._manager.settings.discovery_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _classify(self, raw: list[RawTool]) -> list[DiscoveredTool]:
        overrides = self.record.config.side_effects
        found: dict[str, DiscoveredTool] = {}
        for tool in raw:
            problem = ""
            if not TOOL_NAME.match(tool.name):
                problem = "its name is not 1-64 characters of [A-Za-z0-9_.-]"
            elif tool.name in found:
                problem = "its name is listed twice"
            elif len(tool.description) > MAX_DESCRIPTION_CHARS:
                problem = f"its description is over {MAX_DESCRIPTION_CHARS} characters"
            else:
                try:
                    _validator(tool.input_schema)
                    if tool.output_schema is not None:
                        _validator(tool.output_schema)
                    size = len(str(tool.input_schema)) + len(str(tool.output_schema))
                    if size > MAX_SCHEMA_CHARS:
                        problem = f"its schemas are over {MAX_SCHEMA_CHARS} characters"
                except (SchemaError, TypeError):
                    problem = "its schema is not a valid JSON Schema"
            if problem:
                log.warning(
                    "backend tool skipped",
                    extra={"backend": self.label, "tool": clean(tool.name, 64), "why": problem},
                )
                continue
            found[tool.name] = DiscoveredTool(
                name=tool.name,
                title=tool.title,
                description=tool.description,
                input_schema=tool.input_schema,
                output_schema=tool.output_schema,
                annotations=tool.annotations,
                side_effect=side_effect_of(tool.read_only_hint, overrides.get(tool.name)),
            )
        return list(found.values())

    async def _discover(self, session: Session) -> None:
        tools = self._classify(await session.list_tools())
        now = self._manager.now()
        drifts = await self._manager.store.record_discovery(self.record.id, tools, now)
        for drift in drifts:
            await self._manager.on_drift(self, drift, tools)
        versions = await self._manager.store.versions_of(self.record.id)
        self.live = {tool.name: tool for tool in tools}
        self.last_discovery_at = now
        self.last_error = ""
        self.rebuild(versions)
        self.settle()
        self._discovered.set()

    def rebuild(self, versions: list[VersionRecord] | None = None) -> None:
        """Recompute what is served from the stored versions (``versions``, or the ones read
        last), the stable versions and the last discovery."""
        if versions is not None:
            by_tool: dict[str, list[VersionRecord]] = {}
            for version in versions:
                by_tool.setdefault(version.tool, []).append(version)
            self.versions = by_tool
        tools: dict[str, Tool] = {}
        status: dict[str, str] = {}
        published: dict[str, dict[str, Tool]] = {}
        for name, rows in self.versions.items():
            publishable = [r for r in rows if r.state is VersionState.PUBLISHED]
            if not publishable:
                continue
            built = {r.version: t for r in publishable if (t := self._tool(r)) is not None}
            published[name] = built
            pinned = self._pinned(name, publishable)
            live = self.live.get(name) if self.live is not None else pinned.contract
            if live is None:
                status[name] = MISSING
                continue
            if live.fingerprint() == pinned.fingerprint:
                status[name] = SERVED
            elif (
                pinned.contract.side_effect is SideEffect.READ_ONLY
                and live.side_effect is SideEffect.WRITE
            ):
                status[name] = SUSPENDED
            else:
                status[name] = DRIFTED_SERVED
            if pinned.version in built:
                tools[name] = built[pinned.version]
        self.tools = tools
        self.status = status
        self.published = published
        if self.state in (READY, DRIFTED):
            self.settle()

    def _pinned(self, name: str, publishable: list[VersionRecord]) -> VersionRecord:
        """The stable version of the tool; before the release state knows one, the earliest
        still published (the one served before any later approval)."""
        stable = self._manager.stable_of(self.record.tenant, f"{self.name}.{name}")
        return next((r for r in publishable if r.version == stable), publishable[0])

    def suspended(self, name: str, side_effect: SideEffect) -> bool:
        """True when a version published as read-only is now declared write-capable by the
        backend: serving it as read-only would let a read-only caller write."""
        live = self.live.get(name) if self.live is not None else None
        return (
            live is not None
            and side_effect is SideEffect.READ_ONLY
            and live.side_effect is SideEffect.WRITE
        )

    def serving(self, name: str, version: str = "") -> Tool | None:
        """The Tool of ``version`` of the tool (default: its stable version) when it can be
        called now: published, still offered by the backend, not suspended."""
        status = self.status.get(name)
        if status is None or status == MISSING:
            return None
        if not version:
            return self.tools.get(name) if status in (SERVED, DRIFTED_SERVED) else None
        tool = self.published.get(name, {}).get(version)
        if tool is None or self.suspended(name, tool.spec.side_effect):
            return None
        return tool

    def settle(self) -> None:
        """READY, or DRIFTED while some tool's live contract differs from its published one."""
        drifted = any(s in (DRIFTED_SERVED, SUSPENDED) for s in self.status.values())
        self.state = DRIFTED if drifted else READY

    def _tool(self, pinned: VersionRecord) -> Tool | None:
        contract = pinned.contract
        config = self.record.config
        settings = self._manager.settings
        try:
            input_validator = _validator(contract.input_schema)
            output_validator = _validator(contract.output_schema or {})
        except SchemaError:
            return None
        spec = ToolSpec(
            name=f"{self.name}.{contract.name}",
            version=pinned.version,
            description=contract.description,
            input_schema=contract.input_schema,
            output_schema=contract.output_schema or {},
            side_effect=contract.side_effect,
            cost_units=config.cost_units,
            timeout_ms=config.timeout_ms or settings.timeout_ms,
            fallback_answer=f"The tool {self.name}.{contract.name} is not available right now.",
            max_concurrency=config.max_concurrency or settings.max_concurrency,
        )
        return Tool(
            spec=spec,
            run=partial(self._call, contract.name, contract.side_effect),
            input_validator=input_validator,
            output_validator=output_validator,
            origin=ToolOrigin(
                backend=self.name,
                kind=config.kind.value,
                tenant=self.record.tenant,
                fingerprint=pinned.fingerprint,
            ),
        )

    async def _call(
        self, name: str, side_effect: SideEffect, arguments: dict[str, Any], ctx: ToolContext
    ) -> ToolOutput:
        if self.suspended(name, side_effect):
            raise ToolRunError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tool {self.name}.{name} is suspended: its backend now declares it "
                "write-capable; an operator must approve the new contract",
                tool_fault=False,
            )
        session = await self._session_for_call()
        call = asyncio.ensure_future(
            session.call(
                name,
                arguments,
                idempotency_key=ctx.idempotency_key,
                tenant=ctx.tenant,
                request_id=ctx.request_id,
            )
        )
        self._inflight.add(call)
        try:
            outcome = await call
        except asyncio.CancelledError:
            if call in self._severed:
                raise ToolRunError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"backend {self.name} lost its connection during the call; reconnecting",
                ) from None
            raise
        except BackendFault as fault:
            if fault.broken:
                self.mark_broken(fault.message)
            message = fault.message
            if fault.contract:
                message = f"tool {self.name}.{name} returned a result outside its contract"
            raise ToolRunError(fault.code, message, tool_fault=fault.tool_fault) from None
        finally:
            self._inflight.discard(call)
            self._severed.discard(call)
        return ToolOutput(answer=outcome.answer, result=outcome.result, tool_error=outcome.is_error)


def _describe(error: BaseException) -> str:
    """A short, safe description of a connection failure (the first leaf of a group)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, BackendFault):
        return error.message
    text = clean(str(error), 200)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class BackendManager:
    def __init__(
        self,
        store: BackendStore,
        settings: ManagerSettings,
        *,
        hosts: HostPolicy,
        commands: CommandPolicy,
        audit: RouterAudit | None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.settings = settings
        self.hosts = hosts
        self.commands = commands
        self._audit = audit
        self._clock = clock
        self._runtimes: dict[int, BackendRuntime] = {}
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self.pending: dict[int, int] = {}
        self._noted_rules: set[str] = set()
        # (owning tenant, "<backend>.<tool>") -> its stable version (the release state's).
        self.stable_of: Callable[[str, str], str | None] = lambda _tenant, _name: None
        _MANAGERS.append(self)

    def now(self) -> datetime:
        return self._clock()

    def backoff_s(self, failures: int) -> float:
        """Full jitter: uniform in [min, min(max, min * 2**failures)]."""
        low = self.settings.backoff_min_s
        high = min(self.settings.backoff_max_s, low * 2 ** min(failures, 16))
        return random.uniform(low, max(low, high))

    def metric_labels(self, runtime: BackendRuntime) -> dict[str, str]:
        return {"tenant": runtime.record.audit_tenant, "backend": runtime.name}

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="backend-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self._runtimes.values()))
        self._runtimes.clear()
        with contextlib.suppress(ValueError):
            _MANAGERS.remove(self)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_s)
            try:
                await self.sync()
            except Exception as error:
                log.warning(
                    "backend table could not be read; keeping the backends as they are",
                    extra={"error": _describe(error)},
                )

    async def sync(self) -> None:
        """Match the running backends to the table: start new ones, stop removed ones,
        refresh versions (an approval on another replica)."""
        async with self._sync_lock:
            records, versions = await self.store.load()
            self.pending = await self.store.pending_counts()
            wanted = {record.id: record for record in records}
            for backend_id in [b for b in self._runtimes if b not in wanted]:
                gone = self._runtimes.pop(backend_id)
                log.info("backend removed; stopping it", extra={"backend": gone.label})
                await gone.stop()
            by_backend: dict[int, list[VersionRecord]] = {}
            for version in versions:
                by_backend.setdefault(version.backend_id, []).append(version)
            for backend_id, record in wanted.items():
                known = self._runtimes.get(backend_id)
                if known is None:
                    known = self._runtimes[backend_id] = BackendRuntime(record, self)
                    known.rebuild(by_backend.get(backend_id, []))
                    known.start()
                    log.info("backend added; connecting", extra={"backend": known.label})
                else:
                    known.rebuild(by_backend.get(backend_id, []))

    async def on_drift(
        self, runtime: BackendRuntime, drift: Drift, discovered: list[DiscoveredTool]
    ) -> None:
        """A new pending contract: metric, warning log and a tool.drift audit event."""
        record = runtime.record
        fields = changed_fields(drift.published.contract, drift.pending.contract)
        name = f"{record.name}.{drift.tool}"
        _DRIFTS.add(1, {**self.metric_labels(runtime), "tool": drift.tool})
        self.pending[record.id] = self.pending.get(record.id, 0) + 1
        suspended = (
            drift.published.contract.side_effect is SideEffect.READ_ONLY
            and drift.pending.contract.side_effect is SideEffect.WRITE
        )
        log.warning(
            "backend tool drifted: its contract changed under a published version",
            extra={
                "backend": record.label,
                "tool": drift.tool,
                "pinned": drift.published.version,
                "changed": fields,
                "suspended": suspended,
            },
        )
        if self._audit is None:
            return
        event = audit_event(
            action=AuditAction.AUDIT_ACTION_TOOL_DRIFT,
            tenant=record.audit_tenant,
            actor="router",
            target=f"{name}@{drift.published.version}",
            outcome=FAILURE,
            details={
                "backend": record.name,
                "tool": drift.tool,
                "pinned_version": drift.published.version,
                "pinned_fingerprint": drift.published.fingerprint,
                "pending_fingerprint": drift.pending.fingerprint,
                "changed": fields,
                "served": "suspended" if suspended else "pinned version",
            },
            event_id=derived_event_id(
                "tool.drift", str(record.id), drift.tool, drift.pending.fingerprint
            ),
        )
        try:
            await self._audit.record(event)
        except Exception:
            log.exception("tool.drift audit event could not be stored", extra={"tool": name})

    # --- lookups for the servicer (tenancy: a tenant's own backends, then shared ones) ---

    def runtimes(self) -> list[BackendRuntime]:
        return list(self._runtimes.values())

    def visible(self, tenant: str) -> list[BackendRuntime]:
        return [r for r in self._runtimes.values() if r.record.tenant in ("", tenant)]

    def find(self, tenant: str, name: str) -> BackendRuntime | None:
        """The backend ``name`` as ``tenant`` sees it: its own, else a shared one."""
        shared = None
        for runtime in self._runtimes.values():
            if runtime.name != name:
                continue
            if runtime.record.tenant == tenant and tenant:
                return runtime
            if runtime.record.shared:
                shared = runtime
        return shared

    def by_id(self, backend_id: int) -> BackendRuntime | None:
        return self._runtimes.get(backend_id)

    async def add(self, record: BackendRecord) -> BackendRuntime:
        """Start a backend registered through this replica now (others follow at sync)."""
        async with self._sync_lock:
            runtime = self._runtimes.get(record.id)
            if runtime is None:
                runtime = self._runtimes[record.id] = BackendRuntime(record, self)
                runtime.start()
            return runtime

    async def remove(self, backend_id: int) -> None:
        async with self._sync_lock:
            runtime = self._runtimes.pop(backend_id, None)
        if runtime is not None:
            await runtime.stop()

    def tool(self, tenant: str, name: str) -> tuple[BackendRuntime, str] | None:
        """The backend and its tool name for "<backend>.<tool>", if ``tenant`` may see it."""
        backend, dot, tool = name.partition(".")
        if not dot or not tool:
            return None
        runtime = self.find(tenant, backend)
        if runtime is None:
            return None
        return runtime, tool

    def served(self, tenant: str, name: str, version: str = "") -> Tool | None:
        """The Tool for "<backend>.<tool>" at ``version`` (default: its stable version) as
        ``tenant`` may call it now; None when it may not."""
        found = self.tool(tenant, name)
        if found is None:
            return None
        runtime, tool = found
        return runtime.serving(tool, version)

    def recompute(self) -> None:
        """Re-pin every backend tool after the release state changed a stable version."""
        for runtime in self._runtimes.values():
            runtime.rebuild()

    async def retire(self, tenant: str, name: str, version: str) -> None:
        """Retire a published version a completed release replaced."""
        backend, _, tool = name.partition(".")
        runtime = next(
            (r for r in self._runtimes.values() if r.record.tenant == tenant and r.name == backend),
            None,
        )
        if runtime is not None and await self.store.retire(runtime.record.id, tool, version):
            await self.sync()

    def note_rule(self, name: str, why: str) -> None:
        """Say once that a routing rule names a backend tool that cannot be routed to yet."""
        if name not in self._noted_rules:
            self._noted_rules.add(name)
            log.info("routing rule waits for its backend tool", extra={"tool": name, "why": why})


_MANAGERS: list[BackendManager] = []


def _observe_states(_options: CallbackOptions) -> list[Observation]:
    return [Observation(int(r.state), m.metric_labels(r)) for m in _MANAGERS for r in m.runtimes()]


def _observe_tools(_options: CallbackOptions) -> list[Observation]:
    observations = []
    for manager in _MANAGERS:
        for runtime in manager.runtimes():
            counts = dict.fromkeys((SERVED, DRIFTED_SERVED, SUSPENDED, MISSING), 0)
            for status in runtime.status.values():
                counts[status] += 1
            labels = manager.metric_labels(runtime)
            observations += [
                Observation(count, {**labels, "status": status}) for status, count in counts.items()
            ]
    return observations


def _observe_pending(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(m.pending.get(r.record.id, 0), m.metric_labels(r))
        for m in _MANAGERS
        for r in m.runtimes()
    ]


_DRIFTS = meter().create_counter(
    "toolmesh.router.tool.drifts",
    unit="{contract}",
    description="Contracts a backend changed under a published tool version (recorded PENDING).",
)
_RESTARTS = meter().create_counter(
    "toolmesh.router.backend.restarts",
    unit="{restart}",
    description="Backend sessions lost after working (stdio server exits included), reopened.",
)
meter().create_observable_gauge(
    "toolmesh.router.tool.pending_drifts",
    callbacks=[_observe_pending],
    description="Drifted contracts waiting for approval, by backend.",
)
meter().create_observable_gauge(
    "toolmesh.router.backend.state",
    callbacks=[_observe_states],
    description="Backend state on this replica: 1 connecting, 2 ready, 3 drifted, 4 failing.",
)
meter().create_observable_gauge(
    "toolmesh.router.backend.tools",
    callbacks=[_observe_tools],
    description="Backend tools by status on this replica: served, drifted (pinned version "
    "served), suspended, missing (no longer listed by the backend).",
)
