"""Which version of a tool and of the routing rules serves a caller.

Every tool and the routing rules have a stable version, persisted in the router's database
(services.router.releases): a newly deployed built-in version or a newly approved backend
version is served only through a release (or an operator's explicit promotion), never by being
the latest. On first sight of a unit its current version becomes stable: the latest release of
a built-in tool, the version a backend tool already served, the seed rules file's version.

Under a canary the candidate serves the callers the sticky assignment gives it, per (tenant,
session), or per request for a call outside a session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.router.backends.manager import BackendManager
from services.router.registry import Registry, Tool
from services.router.releases.model import ROUTING_UNIT, UnitKey, UnitKind
from services.router.releases.view import STABLE, ReleaseView
from services.router.routing import ToolLookup, ToolRouter
from services.router.rules import RuleBook

log = logging.getLogger("toolmesh.router.releases")


@dataclass(frozen=True)
class Pick:
    """What serves one caller: the version and whether it is the stable or the candidate."""

    tool: Tool
    unit: UnitKey
    arm: str


class Served:
    def __init__(
        self,
        registry: Registry,
        backends: BackendManager,
        view: ReleaseView,
        routers: dict[str, ToolRouter],
        rules: RuleBook,
    ) -> None:
        self.registry = registry
        self.backends = backends
        self.view = view
        self.routers = routers
        self.rules = rules
        self._warned: set[tuple[UnitKey, str]] = set()

    # -- tools ----------------------------------------------------------------------------------

    def unit_of(self, tenant: str, name: str) -> UnitKey | None:
        """The release unit of tool ``name`` as ``tenant`` sees it (None: no such tool)."""
        if "." not in name:
            return UnitKey(UnitKind.TOOL, "", name) if self.registry.has_name(name) else None
        found = self.backends.tool(tenant, name)
        if found is None:
            return None
        return UnitKey(UnitKind.TOOL, found[0].record.tenant, name)

    def pick(self, tenant: str, name: str, draw: str) -> Pick | None:
        """The version of ``name`` that serves (tenant, draw), if the caller can use it now."""
        unit = self.unit_of(tenant, name)
        if unit is None:
            return None
        version, arm = self.view.assign(unit, tenant, draw)
        if "." not in name:
            tool = self.registry.get(name, version) if version else None
            if tool is None:
                if version:
                    self._warn(unit, version)
                tool = self.registry.latest(name)
        else:
            tool = self.backends.served(tenant, name, version or "")
            if tool is None and version:
                # The stable version is served under its pin (suspension applies to it).
                tool = self.backends.served(tenant, name) if arm == STABLE else None
        return Pick(tool, unit, arm) if tool is not None else None

    def _warn(self, unit: UnitKey, version: str) -> None:
        if (unit, version) not in self._warned:
            self._warned.add((unit, version))
            log.error(
                "the stable version is not in this router's build; serving its latest release",
                extra={"unit": unit.label, "version": version},
            )

    def lookup(self, tenant: str, draw: str) -> ToolLookup:
        """A rule's tool name -> the version serving this caller (for ToolRouter.route)."""

        def find(name: str) -> Tool | None:
            picked = self.pick(tenant, name, draw)
            return picked.tool if picked is not None else None

        return find

    def stable_builtins(self) -> list[Tool]:
        """The stable version of every built-in tool (what ListTools shows)."""
        tools = []
        for name in sorted({t.spec.name for t in self.registry.all()}):
            stable = self.view.stable(UnitKey(UnitKind.TOOL, "", name))
            tool = (self.registry.get(name, stable) if stable else None) or self.registry.latest(
                name
            )
            if tool is not None:
                tools.append(tool)
        return tools

    # -- routing rules --------------------------------------------------------------------------

    def rules_for(self, tenant: str, draw: str) -> tuple[ToolRouter, str]:
        """The rules version that routes (tenant, draw), and its arm."""
        version, arm = self.view.assign(ROUTING_UNIT, tenant, draw)
        router = self.routers.get(version or "")
        if router is None:
            if version:
                self._warn(ROUTING_UNIT, version)
            return self.routers[self.rules.seed], STABLE
        return router, arm
