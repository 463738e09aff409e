"""Authorization decisions: which tools a caller may use and which scope a tool needs."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.authn import Principal
from services.kit.allowlist import tool_allowed
from toolmesh.router.v1 import router_pb2

SCOPE_READ = "tools:read"
SCOPE_WRITE = "tools:write"
SCOPE_OPS_READ = "ops:read"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    # The scope the caller lacks, when that is why it was denied.
    missing_scope: str = ""


def required_scope(side_effect: router_pb2.SideEffect) -> str:
    """Read-only tools need tools:read; anything else (write, or unspecified) needs tools:write."""
    return SCOPE_READ if side_effect == router_pb2.SIDE_EFFECT_READ_ONLY else SCOPE_WRITE


def authorize_tool(
    principal: Principal, tool: router_pb2.ToolContract, allowed_tools: frozenset[str]
) -> Decision:
    """Re-check the router's pick against the allowlist, then the scope its side effect needs."""
    if not tool_allowed(tool.name, allowed_tools):
        return Decision(False, f"tool {tool.name} is not on tenant {principal.tenant}'s allowlist")
    scope = required_scope(tool.side_effect)
    if scope not in principal.scopes:
        return Decision(False, f"tool {tool.name} needs scope {scope}", missing_scope=scope)
    return Decision(True, f"tool {tool.name} allowed with scope {scope}")


_SIDE_EFFECT_NAMES = {
    router_pb2.SIDE_EFFECT_READ_ONLY: "read_only",
    router_pb2.SIDE_EFFECT_WRITE: "write",
}


def side_effect_name(side_effect: router_pb2.SideEffect) -> str:
    return _SIDE_EFFECT_NAMES.get(side_effect, "unspecified")
