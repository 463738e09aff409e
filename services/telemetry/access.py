"""Whose data a caller may read or change: its own tenant's, or every tenant's for the
platform operator. One copy of the rule for every handler that takes a Caller.

The Caller comes only from the gateway (PEER_RULES), which authenticated the token and checked
the scope the RPC needs; this decides the tenant dimension alone.
"""

from __future__ import annotations

from services.kit.audit import KNOWN_ACTIONS
from services.kit.peers import AUTH, GATEWAY, ROUTER
from services.kit.scopes import PLATFORM_ADMIN
from toolmesh.common.v1 import common_pb2


def is_platform_operator(caller: common_pb2.Caller) -> bool:
    return PLATFORM_ADMIN in caller.scopes


def readable_tenant(caller: common_pb2.Caller) -> str | None:
    """The tenant whose data the caller may read; None means every tenant."""
    return None if is_platform_operator(caller) else caller.tenant


def target_tenant(caller: common_pb2.Caller, requested: str) -> str | None:
    """The tenant a change applies to: the one requested (empty: the caller's own), or None
    when the caller may not act on it (another tenant without platform:admin)."""
    tenant = requested or caller.tenant
    if tenant != caller.tenant and not is_platform_operator(caller):
        return None
    return tenant


def another_tenant_refusal(what: str) -> str:
    return f"{what} of another tenant needs scope {PLATFORM_ADMIN}"


# Which audit actions each mesh role may append. The gateway speaks for every caller; auth and
# the router only for what they witness themselves, so a stolen router or auth certificate
# cannot write, say, a forged tool.write into a tenant's chain.
_OWN_AUDIT_ACTIONS: dict[str, frozenset[str]] = {
    AUTH: frozenset(
        {"token.issue", "auth.failure", "permission.denied", "audit.dead_letter"}
        | {a for a in KNOWN_ACTIONS if a.startswith("admin.")}
    ),
    # The router's analyzer decides release transitions itself; the operator's requests
    # (release.start, .pause, .resume, .abort, a manual .promote) are the gateway's to record.
    ROUTER: frozenset(
        {
            "tool.drift",
            "audit.dead_letter",
            "release.gate",
            "release.step",
            "release.promote",
            "release.rollback",
            "release.fail",
            "release.complete",
        }
    ),
}


def audit_action_refusal(role: str | None, action: str) -> str | None:
    """Why the peer in ``role`` may not append ``action``; None when it may. ``role`` None
    means peers are not authenticated (plaintext development): every action passes."""
    if role is None or role == GATEWAY:
        return None
    allowed = _OWN_AUDIT_ACTIONS.get(role, frozenset())
    return None if action in allowed else f"peer {role} may not append {action} events"
