"""Stand-ins for auth, router, memory and telemetry, speaking only their published contracts.

They let the gateway be tested over real gRPC without the other teams' code; each is
programmable so a test can make one dependency fail in a chosen way.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc import aio

from services.kit.buildinfo import service_info
from services.kit.errors import abort
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

ISSUER = "toolmesh-auth"
AUDIENCE = "toolmesh"
ALL_SCOPES = "tools:read tools:write ops:read admin"


@dataclass
class SigningKey:
    kid: str
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": "EdDSA", "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "client-1",
        "tenant": "acme",
        "scope": ALL_SCOPES,
        "roles": ["developer"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: SigningKey, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(
        claims(**overrides),
        key.private,
        algorithm="EdDSA",
        headers={"kid": key.kid, "typ": "at+jwt", **(headers or {})},
    )


class FakeAuth(auth_pb2_grpc.AuthServicer):
    def __init__(self) -> None:
        self.keys = [SigningKey("k1")]
        self.revoked: set[str] = set()
        self.disabled: set[str] = set()
        self.tenants: dict[str, list[str]] = {"acme": ["*"], "small": ["calculator"]}
        self.down = False
        self.jwks_calls = 0
        self.refused = 0  # calls answered UNAVAILABLE while down

    async def _check(self, context: aio.ServicerContext) -> None:
        if self.down:
            self.refused += 1
            await abort(context, grpc.StatusCode.UNAVAILABLE, "auth is down")

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        if (request.client_id, request.client_secret) != ("dev", "s3cret"):
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        scope = " ".join(request.scopes) or ALL_SCOPES
        return auth_pb2.IssueTokenResponse(
            access_token=mint(self.keys[-1], sub="dev", scope=scope),
            token_type="Bearer",
            expires_in=600,
            scopes=scope.split(),
        )

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        await self._check(context)
        self.jwks_calls += 1
        return auth_pb2.GetJwksResponse(
            jwks_json=json.dumps({"keys": [k.jwk() for k in self.keys]})
        )

    async def GetRevocations(
        self, request: auth_pb2.GetRevocationsRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetRevocationsResponse:
        await self._check(context)
        as_of = Timestamp()
        as_of.GetCurrentTime()
        return auth_pb2.GetRevocationsResponse(
            revoked_tokens=[auth_pb2.RevokedToken(token_id=j) for j in sorted(self.revoked)],
            disabled_clients=sorted(self.disabled),
            as_of=as_of,
        )

    async def GetPolicy(
        self, request: auth_pb2.GetPolicyRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetPolicyResponse:
        await self._check(context)
        return auth_pb2.GetPolicyResponse(
            version="test-1",
            tenants=[
                auth_pb2.TenantPolicy(tenant=t, allowed_tools=a) for t, a in self.tenants.items()
            ],
        )

    async def GetServiceInfo(
        self, request: auth_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetServiceInfoResponse:
        return auth_pb2.GetServiceInfoResponse(info=service_info("auth", ["toolmesh.auth.v1"]))


CALCULATOR = router_pb2.ToolContract(
    name="calculator",
    version="1.0.0",
    description="Evaluates an arithmetic expression.",
    input_schema_json=json.dumps(
        {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        }
    ),
    side_effect=router_pb2.SIDE_EFFECT_READ_ONLY,
    cost_units=2,
    timeout_ms=1000,
    fallback_answer="The calculator is unavailable.",
)
SAVE_NOTE = router_pb2.ToolContract(
    name="save_note",
    version="1.0.0",
    side_effect=router_pb2.SIDE_EFFECT_WRITE,
    cost_units=5,
    timeout_ms=1000,
    fallback_answer="Notes are unavailable.",
)


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def backend_tool(
    backend: router_pb2.Backend,
    name: str,
    side_effect: router_pb2.SideEffect = router_pb2.SIDE_EFFECT_READ_ONLY,
    version: str = "1.0.0",
    description: str = "",
) -> router_pb2.ToolContract:
    """A discovered tool of ``backend``, published as ``<backend>.<name>``."""
    full = f"{backend.name}.{name}"
    return router_pb2.ToolContract(
        name=full,
        version=version,
        description=description or f"{name} from {backend.name}",
        input_schema_json='{"type": "object"}',
        side_effect=side_effect,
        cost_units=backend.cost_units,
        timeout_ms=backend.timeout_ms or 1000,
        backend=backend.name,
        backend_kind=backend.kind,
        fingerprint=uuid.uuid5(uuid.NAMESPACE_URL, f"{full}@{version}:{description}").hex * 2,
    )


class FakeRouter(router_pb2_grpc.RouterServicer):
    """Routes "note ..." to save_note, prompts with a digit to calculator, anything else nowhere.

    Backends follow the contract's shape without running anything: a registered backend is
    READY at once with the tools ``discovery[name]`` lists (default: one read-only tool
    ``<name>.echo``), published as version 1.0.0; ``drift`` adds a pending contract.
    """

    def __init__(self) -> None:
        self.tools = {t.name: t for t in (CALCULATOR, SAVE_NOTE)}
        self.backends: dict[str, router_pb2.Backend] = {}
        self.discovery: dict[str, list[tuple[str, router_pb2.SideEffect]]] = {}
        self.versions: dict[str, list[router_pb2.ToolVersion]] = {}
        self.backend_requests: list[object] = []
        self.releases: dict[str, router_pb2.Release] = {}
        self.release_requests: list[object] = []
        self.route_error: grpc.StatusCode | None = None
        self.invoke_error: tuple[grpc.StatusCode, str] | None = None
        # InvokeTool answers as a tool that declined the input (MCP isError).
        self.tool_error = False
        self.invoke_delay_s = 0.0
        # The next this-many InvokeTool calls answer UNAVAILABLE (a replica going away).
        self.invoke_unavailable_times = 0
        self.route_delay_s = 0.0
        # ListTools answers this status with a google.rpc.BadRequest detail naming the field.
        self.list_error: tuple[grpc.StatusCode, str] | None = None
        # Handlers that saw their call cancelled (the gateway gave up or its caller went away).
        self.cancelled: list[str] = []
        self.invoke_started = asyncio.Event()
        self.routes: list[router_pb2.RouteRequest] = []
        self.invocations: list[router_pb2.InvokeToolRequest] = []
        # Seconds each InvokeTool had left when it arrived: the gateway's deadline propagation.
        self.invoke_budgets: list[float | None] = []

    async def Route(
        self, request: router_pb2.RouteRequest, context: aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        self.routes.append(request)
        if self.route_delay_s:
            await self._sleep("Route", self.route_delay_s)
        if self.route_error is not None:
            await abort(context, self.route_error, "router failure")
        parts = router_pb2.ConfidenceParts(intent=0.9, schema_fit=1.0, health=1.0)
        if request.prompt.startswith("note"):
            tool = self.tools["save_note"]
        elif any(c.isdigit() for c in request.prompt):
            tool = self.tools["calculator"]
        else:
            return router_pb2.RouteResponse(
                matched=False, confidence=0.1, threshold=0.5, reason="no intent matched"
            )
        return router_pb2.RouteResponse(
            matched=True,
            tool=tool,
            arguments_json=json.dumps({"text": request.prompt}),
            confidence=0.93,
            parts=parts,
            threshold=0.5,
            reason="intent matched",
        )

    async def InvokeTool(
        self, request: router_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> router_pb2.InvokeToolResponse:
        self.invocations.append(request)
        self.invoke_budgets.append(context.time_remaining())
        self.invoke_started.set()
        if self.invoke_unavailable_times > 0:
            self.invoke_unavailable_times -= 1
            await abort(context, grpc.StatusCode.UNAVAILABLE, "router replica going away")
        if self.invoke_delay_s:
            await self._sleep("InvokeTool", self.invoke_delay_s)
        if self.invoke_error is not None:
            await abort(context, *self.invoke_error)
        if self.tool_error:
            return router_pb2.InvokeToolResponse(
                tool_name=request.tool_name,
                tool_version=request.tool_version,
                answer="unknown timezone",
                tool_error=True,
            )
        return router_pb2.InvokeToolResponse(
            tool_name=request.tool_name,
            tool_version=request.tool_version,
            answer=f"{request.tool_name} says 391",
            result_json='{"value": 391}',
        )

    async def ResolveTool(
        self, request: router_pb2.ResolveToolRequest, context: aio.ServicerContext
    ) -> router_pb2.ResolveToolResponse:
        tool = self.tools.get(request.tool_name)
        allowed = set(request.allowed_tools)
        if (
            tool is None
            or request.tool_version not in ("", tool.version)
            or not ("*" in allowed or tool.name in allowed)
        ):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no tool {request.tool_name}")
        return router_pb2.ResolveToolResponse(tool=tool)

    async def _sleep(self, method: str, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append(method)
            raise

    async def ListTools(
        self, request: router_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolsResponse:
        if self.list_error is not None:
            code, field_name = self.list_error
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=field_name, description="not acceptable"
            )
            await abort(
                context,
                code,
                f"{field_name}: not acceptable",
                error_details_pb2.BadRequest(field_violations=[violation]),
            )
        allowed = set(request.allowed_tools)
        return router_pb2.ListToolsResponse(
            tools=[t for t in self.tools.values() if "*" in allowed or t.name in allowed]
        )

    async def GetServiceInfo(
        self, request: router_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> router_pb2.GetServiceInfoResponse:
        return router_pb2.GetServiceInfoResponse(
            info=service_info("router", ["toolmesh.router.v1"])
        )

    # -- backends -------------------------------------------------------------------------

    async def RegisterBackend(
        self, request: router_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> router_pb2.RegisterBackendResponse:
        self.backend_requests.append(request)
        backend = router_pb2.Backend()
        backend.CopyFrom(request.backend)
        if not backend.name or backend.kind == router_pb2.BACKEND_KIND_UNSPECIFIED:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "backend.name: required")
        if backend.name in self.backends:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"backend {backend.name} exists")
        backend.tenant = "" if request.shared else request.caller.tenant
        backend.state = router_pb2.BACKEND_STATE_READY
        backend.created_by = request.caller.subject
        backend.created_at.CopyFrom(_now())
        backend.last_discovery_at.CopyFrom(_now())
        found = self.discovery.get(backend.name, [("echo", router_pb2.SIDE_EFFECT_READ_ONLY)])
        for name, discovered in found:
            side_effect = discovered
            side = backend.side_effects.get(name)
            if side:
                side_effect = (
                    router_pb2.SIDE_EFFECT_WRITE
                    if side == "write"
                    else router_pb2.SIDE_EFFECT_READ_ONLY
                )
            tool = backend_tool(backend, name, side_effect)
            backend.tools.append(tool)
            self.tools[tool.name] = tool
            self.versions[tool.name] = [
                router_pb2.ToolVersion(
                    contract=tool,
                    state=router_pb2.TOOL_VERSION_STATE_PUBLISHED,
                    discovered_at=_now(),
                )
            ]
        self.backends[backend.name] = backend
        return router_pb2.RegisterBackendResponse(backend=backend)

    async def ListBackends(
        self, request: router_pb2.ListBackendsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListBackendsResponse:
        return router_pb2.ListBackendsResponse(
            backends=[b for b in self.backends.values() if b.tenant in ("", request.caller.tenant)]
        )

    async def RemoveBackend(
        self, request: router_pb2.RemoveBackendRequest, context: aio.ServicerContext
    ) -> router_pb2.RemoveBackendResponse:
        backend = self.backends.get(request.name)
        if backend is None or backend.tenant not in ("", request.caller.tenant):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no backend {request.name}")
        del self.backends[request.name]
        for tool in backend.tools:
            self.tools.pop(tool.name, None)
        return router_pb2.RemoveBackendResponse()

    def drift(self, tool_name: str, description: str) -> router_pb2.ToolVersion:
        """A later discovery found another contract under the published version."""
        published = self.versions[tool_name][-1].contract
        changed = router_pb2.ToolContract()
        changed.CopyFrom(published)
        changed.description = description
        changed.fingerprint = uuid.uuid5(uuid.NAMESPACE_URL, description).hex * 2
        pending = router_pb2.ToolVersion(
            contract=changed, state=router_pb2.TOOL_VERSION_STATE_PENDING, discovered_at=_now()
        )
        self.versions[tool_name].append(pending)
        backend = self.backends[published.backend]
        backend.state = router_pb2.BACKEND_STATE_DRIFTED
        return pending

    async def ListToolVersions(
        self, request: router_pb2.ListToolVersionsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolVersionsResponse:
        if request.tool_name not in self.versions:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no tool {request.tool_name}")
        return router_pb2.ListToolVersionsResponse(versions=self.versions[request.tool_name])

    async def ApproveToolVersion(
        self, request: router_pb2.ApproveToolVersionRequest, context: aio.ServicerContext
    ) -> router_pb2.ApproveToolVersionResponse:
        history = self.versions.get(request.tool_name, [])
        pending = [
            v
            for v in history
            if v.state == router_pb2.TOOL_VERSION_STATE_PENDING
            and v.contract.fingerprint == request.fingerprint
        ]
        if not pending:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"no pending contract {request.fingerprint}"
            )
        # Published beside the stable version; a release makes it the stable one.
        approved = pending[0]
        approved.state = router_pb2.TOOL_VERSION_STATE_PUBLISHED
        approved.contract.version = request.version
        approved.decided_by = request.caller.subject
        approved.decided_at.CopyFrom(_now())
        return router_pb2.ApproveToolVersionResponse(version=approved)

    # Releases follow the contract's shape: a start is a canary at its first step (shadow
    # first for a read-only default plan), refused when the candidate is "bad"; controls move
    # the state as the router would.

    async def StartRelease(
        self, request: router_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.StartReleaseResponse:
        self.release_requests.append(request)
        if request.candidate_version == "bad":
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "release r0 refused: examples"
            )
        plan = router_pb2.ReleasePlan()
        plan.CopyFrom(request.plan)
        if not plan.steps:
            plan.steps.extend([5, 25, 50, 100])
        canary = plan.kind != router_pb2.RELEASE_PLAN_KIND_SHADOW_THEN_CANARY
        release = router_pb2.Release(
            id=f"r{len(self.releases) + 1}",
            unit=router_pb2.ReleaseUnit(
                kind=request.unit.kind,
                name=request.unit.name,
                tenant=request.caller.tenant if "." in request.unit.name else "",
            ),
            stable_version="1.0.0",
            candidate_version=request.candidate_version,
            plan=plan,
            state=router_pb2.RELEASE_STATE_CANARY if canary else router_pb2.RELEASE_STATE_SHADOW,
            weight=plan.steps[0] if canary else 0,
            step=0 if canary else -1,
            started_at=_now(),
            started_by=request.caller.subject,
            events=[router_pb2.ReleaseEvent(at=_now(), action="start", actor="dev")],
        )
        self.releases[release.id] = release
        return router_pb2.StartReleaseResponse(release=release)

    async def GetRelease(
        self, request: router_pb2.GetReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.GetReleaseResponse:
        if request.id not in self.releases:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no release {request.id}")
        return router_pb2.GetReleaseResponse(release=self.releases[request.id])

    async def ListReleases(
        self, request: router_pb2.ListReleasesRequest, context: aio.ServicerContext
    ) -> router_pb2.ListReleasesResponse:
        self.release_requests.append(request)
        active = (router_pb2.RELEASE_STATE_SHADOW, router_pb2.RELEASE_STATE_CANARY)
        return router_pb2.ListReleasesResponse(
            releases=[
                r
                for r in self.releases.values()
                if (not request.unit.kind or r.unit.name == request.unit.name)
                and (not request.active_only or r.state in active)
            ]
        )

    async def ControlRelease(
        self, request: router_pb2.ControlReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.ControlReleaseResponse:
        self.release_requests.append(request)
        release = self.releases.get(request.id)
        if release is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no release {request.id}")
        if request.action == router_pb2.RELEASE_CONTROL_ABORT:
            release.state, release.weight = router_pb2.RELEASE_STATE_ABORTED, 0
        elif request.action == router_pb2.RELEASE_CONTROL_PAUSE:
            release.paused_state, release.state = release.state, router_pb2.RELEASE_STATE_PAUSED
        elif request.action == router_pb2.RELEASE_CONTROL_RESUME:
            release.state = release.paused_state
        else:
            release.state, release.weight = router_pb2.RELEASE_STATE_MONITORING, 100
        return router_pb2.ControlReleaseResponse(release=release)


class FakeMemory(memory_pb2_grpc.MemoryServicer):
    def __init__(self) -> None:
        self.turns: dict[tuple[str, str], list[common_pb2.Turn]] = {}
        self.seen: set[str] = set()
        self.fail_reads = False
        self.fail_writes = False
        # AppendTurns calls and turn pairs stored, by request id (a duplicate is not stored).
        self.append_calls: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        # Idempotency claims by (tenant, request id): (session, fingerprint, response or None).
        self.claims: dict[tuple[str, str], tuple[str, str, bytes | None]] = {}

    async def AppendTurns(
        self, request: memory_pb2.AppendTurnsRequest, context: aio.ServicerContext
    ) -> memory_pb2.AppendTurnsResponse:
        self.append_calls[request.request_id] += 1
        if self.fail_writes:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "memory is down")
        if request.request_id in self.seen:
            return memory_pb2.AppendTurnsResponse(duplicate=True)
        self.seen.add(request.request_id)
        self.stored[request.request_id] += 1
        if request.fingerprint:
            key = (request.caller.tenant, request.request_id)
            self.claims[key] = (request.session_id, request.fingerprint, request.response)
        stored = self.turns.setdefault((request.caller.tenant, request.session_id), [])
        for turn in request.turns:
            copy = common_pb2.Turn()
            copy.CopyFrom(turn)
            copy.seq = len(stored) + 1
            stored.append(copy)
        return memory_pb2.AppendTurnsResponse(turns=request.turns)

    async def ClaimRequest(
        self, request: memory_pb2.ClaimRequestRequest, context: aio.ServicerContext
    ) -> memory_pb2.ClaimRequestResponse:
        """The contract's semantics, without leases expiring (tests run well inside them)."""
        if self.fail_writes:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "memory is down")
        key = (request.caller.tenant, request.request_id)
        claim = self.claims.get(key)
        if claim is None:
            self.claims[key] = (request.session_id, request.fingerprint, None)
            return memory_pb2.ClaimRequestResponse(state=memory_pb2.CLAIM_STATE_CLAIMED)
        session, fingerprint, response = claim
        if session != request.session_id:
            return memory_pb2.ClaimRequestResponse(
                state=memory_pb2.CLAIM_STATE_CONFLICT, conflict="session"
            )
        if fingerprint != request.fingerprint:
            return memory_pb2.ClaimRequestResponse(
                state=memory_pb2.CLAIM_STATE_CONFLICT, conflict="content"
            )
        if response is None:
            return memory_pb2.ClaimRequestResponse(state=memory_pb2.CLAIM_STATE_IN_PROGRESS)
        return memory_pb2.ClaimRequestResponse(
            state=memory_pb2.CLAIM_STATE_COMPLETED, response=response
        )

    async def ReleaseRequest(
        self, request: memory_pb2.ReleaseRequestRequest, context: aio.ServicerContext
    ) -> memory_pb2.ReleaseRequestResponse:
        key = (request.caller.tenant, request.request_id)
        claim = self.claims.get(key)
        if claim is None or claim[2] is not None or claim[1] != request.fingerprint:
            return memory_pb2.ReleaseRequestResponse(released=False)
        del self.claims[key]
        return memory_pb2.ReleaseRequestResponse(released=True)

    async def GetHistory(
        self, request: memory_pb2.GetHistoryRequest, context: aio.ServicerContext
    ) -> memory_pb2.GetHistoryResponse:
        if self.fail_reads:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "memory is down")
        stored = self.turns.get((request.caller.tenant, request.session_id), [])
        return memory_pb2.GetHistoryResponse(turns=stored[-(request.limit or 100) :])

    async def GetServiceInfo(
        self, request: memory_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> memory_pb2.GetServiceInfoResponse:
        return memory_pb2.GetServiceInfoResponse(
            info=service_info("memory", ["toolmesh.memory.v1"])
        )


class FakeTelemetry(telemetry_pb2_grpc.TelemetryServicer):
    """No budget applies to anyone; usage records and audit events are kept as received
    (tests/unit/gateway/fake_ledger.py adds prices, budgets and outages)."""

    def __init__(self) -> None:
        self.usage: list[telemetry_pb2.UsageRecord] = []
        self.audit: list[telemetry_pb2.AuditEvent] = []

    async def GetPrices(
        self, request: telemetry_pb2.GetPricesRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetPricesResponse:
        return telemetry_pb2.GetPricesResponse(
            version="test-prices-1",
            currency="USD",
            input_per_1k_tokens_micros=3000,
            output_per_1k_tokens_micros=15000,
            per_tool_call_micros=1000,
            per_cost_unit_micros=500,
        )

    async def ReserveBudget(
        self, request: telemetry_pb2.ReserveBudgetRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.ReserveBudgetResponse:
        return telemetry_pb2.ReserveBudgetResponse(unlimited=True)

    async def GetBudgetState(
        self, request: telemetry_pb2.GetBudgetStateRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetBudgetStateResponse:
        return telemetry_pb2.GetBudgetStateResponse(budgeted=False)

    async def RecordUsage(
        self, request: telemetry_pb2.RecordUsageRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.RecordUsageResponse:
        self.usage.extend(request.records)
        return telemetry_pb2.RecordUsageResponse(stored=len(request.records))

    async def AppendAudit(
        self, request: telemetry_pb2.AppendAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.AppendAuditResponse:
        self.audit.extend(request.events)
        return telemetry_pb2.AppendAuditResponse(stored=len(request.events))

    async def GetStats(
        self, request: telemetry_pb2.GetStatsRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetStatsResponse:
        return telemetry_pb2.GetStatsResponse(
            rows=[telemetry_pb2.StatsRow(service="toolmesh-gateway", count=3, p50_ms=1.5)]
        )

    async def GetServiceInfo(
        self, request: telemetry_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetServiceInfoResponse:
        return telemetry_pb2.GetServiceInfoResponse(
            info=service_info("telemetry", ["toolmesh.telemetry.v1"])
        )


@dataclass
class Fakes:
    auth: FakeAuth = field(default_factory=FakeAuth)
    router: FakeRouter = field(default_factory=FakeRouter)
    memory: FakeMemory = field(default_factory=FakeMemory)
    telemetry: FakeTelemetry = field(default_factory=FakeTelemetry)

    async def register(self, server: aio.Server) -> Sequence[str]:
        auth_pb2_grpc.add_AuthServicer_to_server(self.auth, server)
        router_pb2_grpc.add_RouterServicer_to_server(self.router, server)
        memory_pb2_grpc.add_MemoryServicer_to_server(self.memory, server)
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(self.telemetry, server)
        return [
            "toolmesh.auth.v1.Auth",
            "toolmesh.router.v1.Router",
            "toolmesh.memory.v1.Memory",
            "toolmesh.telemetry.v1.Telemetry",
        ]
