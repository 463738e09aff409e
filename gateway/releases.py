"""Releases of tools, routing rules and prompts: start, show, list and control, passed to the
router, which owns releases and enforces whose unit is whose (docs/releases.md).

Scopes: showing and listing need ``ops:read``; starting and controlling need ``admin``, and
``platform:admin`` to start a release of a platform-wide unit (built-in tools, the routing rules,
the platform prompt selection; the router also refuses a shared backend's tool, and controls of
platform releases, without it). Every start and control is audited in the caller's tenant's
trail (``release.start``, ``.promote``, ``.pause``, ``.resume``, ``.abort``), whether it
succeeded or was refused; the router records what each did to the release in its history.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpc import aio

from gateway.access import caller_proto
from gateway.backends import BackendAdmin
from services.kit import scopes
from services.kit.errors import abort_invalid
from toolmesh.common.v1 import audit_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2

_CONTROLS = {
    router_pb2.RELEASE_CONTROL_PROMOTE: audit_pb2.AUDIT_ACTION_RELEASE_PROMOTE,
    router_pb2.RELEASE_CONTROL_PAUSE: audit_pb2.AUDIT_ACTION_RELEASE_PAUSE,
    router_pb2.RELEASE_CONTROL_RESUME: audit_pb2.AUDIT_ACTION_RELEASE_RESUME,
    router_pb2.RELEASE_CONTROL_ABORT: audit_pb2.AUDIT_ACTION_RELEASE_ABORT,
}


def _platform_unit(request: gateway_pb2.StartReleaseRequest) -> bool:
    """Units every tenant's traffic reaches, as far as the request shows (a shared backend's
    tool looks like a tenant's here; the router checks that one)."""
    unit = request.unit
    if unit.kind == router_pb2.RELEASE_UNIT_KIND_ROUTING:
        return True
    if unit.kind == router_pb2.RELEASE_UNIT_KIND_TOOL:
        return "." not in unit.name
    return request.shared


def _target(unit: router_pb2.ReleaseUnit, version: str) -> str:
    kind = router_pb2.ReleaseUnitKind.Name(unit.kind).removeprefix("RELEASE_UNIT_KIND_").lower()
    name = f":{unit.name[:128]}" if unit.name else ""
    return f"{kind}{name}@{version[:64]}"


@dataclass
class ReleaseAdmin:
    # Its ``ask`` authenticates with a scope, asks the router and audits the change.
    admin: BackendAdmin

    async def StartRelease(
        self, request: gateway_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.StartReleaseResponse:
        plan = request.plan
        reply = await self.admin.ask(
            context,
            scopes.PLATFORM_ADMIN if _platform_unit(request) else scopes.ADMIN,
            self.admin.router.StartRelease,
            lambda principal: router_pb2.StartReleaseRequest(
                caller=caller_proto(principal),
                unit=router_pb2.ReleaseUnit(kind=request.unit.kind, name=request.unit.name),
                candidate_version=request.candidate_version,
                plan=plan,
                allow_breaking=request.allow_breaking,
                examples_json=request.examples_json,
                shared=request.shared,
                reason=request.reason,
            ),
            (
                audit_pb2.AUDIT_ACTION_RELEASE_START,
                _target(request.unit, request.candidate_version),
                {
                    "plan": router_pb2.ReleasePlanKind.Name(plan.kind),
                    "allow_breaking": request.allow_breaking,
                    "shared": request.shared,
                    "reason": request.reason[:500],
                },
            ),
        )
        return gateway_pb2.StartReleaseResponse(release=reply.release)

    async def GetRelease(
        self, request: gateway_pb2.GetReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetReleaseResponse:
        reply = await self.admin.ask(
            context,
            scopes.OPS_READ,
            self.admin.router.GetRelease,
            lambda principal: router_pb2.GetReleaseRequest(
                caller=caller_proto(principal), id=request.id
            ),
        )
        return gateway_pb2.GetReleaseResponse(release=reply.release)

    async def ListReleases(
        self, request: gateway_pb2.ListReleasesRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListReleasesResponse:
        reply = await self.admin.ask(
            context,
            scopes.OPS_READ,
            self.admin.router.ListReleases,
            lambda principal: router_pb2.ListReleasesRequest(
                caller=caller_proto(principal),
                unit=request.unit,
                active_only=request.active_only,
                limit=request.limit,
            ),
        )
        return gateway_pb2.ListReleasesResponse(releases=reply.releases)

    async def ControlRelease(
        self, request: gateway_pb2.ControlReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ControlReleaseResponse:
        action = _CONTROLS.get(request.action)
        if action is None:
            await abort_invalid(context, [("action", "one of PROMOTE, PAUSE, RESUME or ABORT")])
        reply = await self.admin.ask(
            context,
            scopes.ADMIN,
            self.admin.router.ControlRelease,
            lambda principal: router_pb2.ControlReleaseRequest(
                caller=caller_proto(principal),
                id=request.id,
                action=request.action,
                reason=request.reason,
            ),
            (
                action,
                f"release:{request.id[:32]}",
                {"reason": request.reason[:500]},
            ),
        )
        return gateway_pb2.ControlReleaseResponse(release=reply.release)
