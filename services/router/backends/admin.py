"""The backend registry's RPCs, for the servicer: register, list, remove, versions, approve.

The gateway authorizes the caller (scope ``admin``, or ``platform:admin`` for shared backends)
and audits registration, removal and approval; the router enforces tenancy itself: a tenant's
admin sees and changes only its own backends (another tenant's are NOT_FOUND, like unknown
ones) and may see but not change shared ones (PERMISSION_DENIED).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.errors import abort, abort_invalid
from services.kit.scopes import PLATFORM_ADMIN
from services.router.backends import registration
from services.router.backends.config import KIND_TO_PROTO, BackendRecord
from services.router.backends.contracts import approval_problem
from services.router.backends.manager import BackendManager, BackendRuntime
from services.router.backends.store import ApprovalRefused, NameTaken, VersionRecord, VersionState
from services.router.registry import SideEffect, Tool
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2

# Time kept back from the caller's deadline so that the answer still reaches it.
ANSWER_RESERVE_S = 0.2
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_VERSION_STATES = {
    VersionState.PUBLISHED: router_pb2.TOOL_VERSION_STATE_PUBLISHED,
    VersionState.PENDING: router_pb2.TOOL_VERSION_STATE_PENDING,
    VersionState.RETIRED: router_pb2.TOOL_VERSION_STATE_RETIRED,
}
_SIDE_EFFECTS = {
    SideEffect.READ_ONLY: router_pb2.SIDE_EFFECT_READ_ONLY,
    SideEffect.WRITE: router_pb2.SIDE_EFFECT_WRITE,
}


def _stamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _platform(caller: common_pb2.Caller) -> bool:
    return PLATFORM_ADMIN in caller.scopes


class BackendAdmin:
    def __init__(
        self,
        manager: BackendManager,
        *,
        secret_dirs: list[Path] | None,
        register_wait_s: float,
        contract: Callable[[Tool], router_pb2.ToolContract],
    ) -> None:
        self.manager = manager
        self._secret_dirs = secret_dirs
        self._register_wait_s = register_wait_s
        self._contract = contract

    def served_tools(self, tenant: str) -> list[Tool]:
        """Backend tools ``tenant`` may call now (pinned versions of drifted ones included)."""
        return [
            runtime.tools[name]
            for runtime in self.manager.visible(tenant)
            for name in sorted(runtime.tools)
            if self.manager.served(tenant, f"{runtime.name}.{name}") is not None
        ]

    def backend_message(self, runtime: BackendRuntime) -> router_pb2.Backend:
        record = runtime.record
        config = record.config
        message = router_pb2.Backend(
            name=config.name,
            kind=KIND_TO_PROTO[config.kind],
            command=list(config.command),
            url=config.url,
            target=config.target,
            bearer_file=config.bearer_file,
            bearer_env=config.bearer_env,
            side_effects=dict(config.side_effects),
            cost_units=config.cost_units,
            timeout_ms=config.timeout_ms,
            max_concurrency=config.max_concurrency,
            tenant=record.tenant,
            state=runtime.state,
            last_error=runtime.last_error,
            tools=[self._contract(runtime.tools[name]) for name in sorted(runtime.tools)],
            created_by=record.created_by,
        )
        for field, value in (
            ("last_discovery_at", runtime.last_discovery_at),
            ("created_at", record.created_at),
        ):
            stamp = _stamp(value)
            if stamp is not None:
                getattr(message, field).CopyFrom(stamp)
        return message

    def version_message(
        self, record: BackendRecord, version: VersionRecord
    ) -> router_pb2.ToolVersion:
        contract = version.contract
        config = record.config
        settings = self.manager.settings
        message = router_pb2.ToolVersion(
            contract=router_pb2.ToolContract(
                name=f"{config.name}.{contract.name}",
                version=version.version,
                description=contract.description,
                input_schema_json=_json(contract.input_schema),
                output_schema_json=(
                    _json(contract.output_schema) if contract.output_schema is not None else ""
                ),
                side_effect=_SIDE_EFFECTS[contract.side_effect],
                cost_units=config.cost_units,
                timeout_ms=config.timeout_ms or settings.timeout_ms,
                backend=config.name,
                backend_kind=KIND_TO_PROTO[config.kind],
                fingerprint=version.fingerprint,
            ),
            state=_VERSION_STATES[version.state],
            decided_by=version.decided_by,
        )
        for field, value in (
            ("discovered_at", version.discovered_at),
            ("decided_at", version.decided_at),
        ):
            stamp = _stamp(value)
            if stamp is not None:
                getattr(message, field).CopyFrom(stamp)
        return message

    async def _tenant(self, caller: common_pb2.Caller, context: aio.ServicerContext) -> str:
        if not caller.tenant:
            await abort_invalid(context, [("caller.tenant", "required")])
        return caller.tenant

    async def register(
        self, request: router_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> router_pb2.Backend:
        tenant = await self._tenant(request.caller, context)
        if request.shared and not _platform(request.caller):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a shared backend needs the scope {PLATFORM_ADMIN}",
            )
        config, problems = await registration.validate(
            request.backend,
            hosts=self.manager.hosts,
            commands=self.manager.commands,
            secret_dirs=self._secret_dirs,
        )
        if config is None:
            await abort_invalid(context, problems)
        try:
            record = await self.manager.store.create(
                config,
                tenant="" if request.shared else tenant,
                created_by=request.caller.subject,
                now=self.manager.now(),
            )
        except NameTaken:
            await abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"a backend named {config.name} already exists",
            )
        runtime = await self.manager.add(record)
        wait_s = self._register_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - ANSWER_RESERVE_S)
        await runtime.first_discovery(wait_s)
        return self.backend_message(runtime)

    async def list_backends(
        self, caller: common_pb2.Caller, context: aio.ServicerContext
    ) -> list[router_pb2.Backend]:
        tenant = await self._tenant(caller, context)
        runtimes = self.manager.runtimes() if _platform(caller) else self.manager.visible(tenant)
        runtimes.sort(key=lambda r: (r.record.tenant, r.name))
        return [self.backend_message(r) for r in runtimes]

    async def _owned(
        self, caller: common_pb2.Caller, name: str, context: aio.ServicerContext
    ) -> BackendRuntime:
        """The backend ``name`` the caller may change: its tenant's own, or a shared one for a
        platform operator."""
        tenant = await self._tenant(caller, context)
        runtime = self.manager.find(tenant, name)
        if runtime is None:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"backend {name[:64]} is not registered"
            )
        if runtime.record.shared and not _platform(caller):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"backend {name} is shared; changing it needs the scope {PLATFORM_ADMIN}",
            )
        return runtime

    async def remove(
        self, caller: common_pb2.Caller, name: str, context: aio.ServicerContext
    ) -> None:
        runtime = await self._owned(caller, name, context)
        await self.manager.store.remove(runtime.record.id)
        await self.manager.remove(runtime.record.id)

    async def _tool(
        self, caller: common_pb2.Caller, tool_name: str, context: aio.ServicerContext
    ) -> tuple[BackendRuntime, str]:
        tenant = await self._tenant(caller, context)
        found = self.manager.tool(tenant, tool_name)
        if found is None:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"tool {tool_name[:128]} is not registered"
            )
        return found

    async def versions(
        self, caller: common_pb2.Caller, tool_name: str, context: aio.ServicerContext
    ) -> list[router_pb2.ToolVersion]:
        runtime, tool = await self._tool(caller, tool_name, context)
        versions = await self.manager.store.versions(runtime.record.id, tool)
        if not versions:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"tool {tool_name[:128]} is not registered"
            )
        return [self.version_message(runtime.record, v) for v in versions]

    async def approve(
        self, request: router_pb2.ApproveToolVersionRequest, context: aio.ServicerContext
    ) -> router_pb2.ToolVersion:
        problems = []
        if not _FINGERPRINT.match(request.fingerprint):
            problems.append(("fingerprint", "the pending contract's SHA-256 (64 hex digits)"))
        if not request.version:
            problems.append(("version", "required"))
        if problems:
            await abort_invalid(context, problems)
        runtime, tool = await self._tool(request.caller, request.tool_name, context)
        await self._owned(request.caller, runtime.name, context)
        try:
            approved = await self.manager.store.approve(
                runtime.record.id,
                tool,
                request.fingerprint,
                request.version,
                actor=request.caller.subject,
                now=self.manager.now(),
                check=approval_problem,
            )
        except ApprovalRefused as refused:
            if refused.not_found:
                await abort(context, grpc.StatusCode.NOT_FOUND, str(refused))
            await abort_invalid(context, [("version", str(refused))])
        # Served here at once; other replicas within backend_sync_s.
        await self.manager.sync()
        return self.version_message(runtime.record, approved)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True)
