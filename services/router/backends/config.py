"""A backend's registration: validated once, stored as JSON, identical on every replica."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from toolmesh.router.v1 import router_pb2

# Tenant of the audit events and metrics of a shared backend (registered by the platform).
PLATFORM_TENANT = "_platform"


class Kind(StrEnum):
    MCP_STDIO = "mcp_stdio"
    MCP_HTTP = "mcp_http"
    GRPC = "grpc"


KIND_TO_PROTO = {
    Kind.MCP_STDIO: router_pb2.BACKEND_KIND_MCP_STDIO,
    Kind.MCP_HTTP: router_pb2.BACKEND_KIND_MCP_HTTP,
    Kind.GRPC: router_pb2.BACKEND_KIND_GRPC,
}
PROTO_TO_KIND = {value: kind for kind, value in KIND_TO_PROTO.items()}


@dataclass(frozen=True)
class BackendConfig:
    """Everything an operator set at registration; secrets only as where to read them."""

    name: str
    kind: Kind
    command: tuple[str, ...] = ()
    url: str = ""
    target: str = ""
    bearer_file: str = ""
    bearer_env: str = ""
    side_effects: Mapping[str, str] = field(default_factory=dict)
    cost_units: int = 0
    timeout_ms: int = 0
    max_concurrency: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "command": list(self.command),
                "url": self.url,
                "target": self.target,
                "bearer_file": self.bearer_file,
                "bearer_env": self.bearer_env,
                "side_effects": dict(self.side_effects),
                "cost_units": self.cost_units,
                "timeout_ms": self.timeout_ms,
                "max_concurrency": self.max_concurrency,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, name: str, text: str) -> BackendConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(
            name=name,
            kind=Kind(data["kind"]),
            command=tuple(data.get("command", ())),
            url=data.get("url", ""),
            target=data.get("target", ""),
            bearer_file=data.get("bearer_file", ""),
            bearer_env=data.get("bearer_env", ""),
            side_effects=dict(data.get("side_effects", {})),
            cost_units=int(data.get("cost_units", 0)),
            timeout_ms=int(data.get("timeout_ms", 0)),
            max_concurrency=int(data.get("max_concurrency", 0)),
        )


@dataclass(frozen=True)
class BackendRecord:
    """A stored registration; ``id`` changes when a name is removed and registered again."""

    id: int
    tenant: str
    config: BackendConfig
    created_at: datetime
    created_by: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def shared(self) -> bool:
        return not self.tenant

    @property
    def audit_tenant(self) -> str:
        return self.tenant or PLATFORM_TENANT

    @property
    def label(self) -> str:
        """For logs and metrics: tenant/name, which is unique."""
        return f"{self.audit_tenant}/{self.name}"
