"""Settings of the MCP face: TOOLMESH_MCPFACE_<FIELD>, falling back to TOOLMESH_<FIELD>."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.kit.settings import DEFAULT_PORTS, ServiceSettings


class McpFaceSettings(ServiceSettings):
    service_name: ClassVar[str] = "mcpface"
    # Its callers are outside the mesh (IDEs, agent frameworks): a public service.
    inner: ClassVar[bool] = False

    # HTTP port of the MCP endpoint (streamable HTTP at `path`) and of /healthz and /readyz.
    port: int = Field(default=DEFAULT_PORTS["mcpface"], ge=0, le=65535)
    # The MCP endpoint's path.
    path: str = Field(default="/mcp", pattern=r"^/[A-Za-z0-9._~/-]*$")
    # The gateway the face calls over gRPC (host:port, ipv4:a:p,b:p or dns:///name:port);
    # mutual TLS when this process has a certificate (TOOLMESH_TLS_*), as for every service.
    gateway_target: str = f"127.0.0.1:{DEFAULT_PORTS['gateway']}"
    # Deadline of one tools/call through the gateway (the gateway caps it at its own maximum).
    call_timeout_s: float = Field(default=30.0, gt=0, le=300)
    # Deadline of tools/list and of a token check through the gateway.
    list_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # A token the gateway accepted is trusted at the HTTP layer for this long (never past its
    # expiry) before it is checked again; the gateway still verifies it on every call.
    token_cache_s: float = Field(default=30.0, ge=0, le=300)
    # Tokens remembered at once (least recently used are forgotten first).
    token_cache_size: int = Field(default=10_000, ge=1)
    # The readiness probe's gateway health check is reused for this long.
    readiness_cache_s: float = Field(default=1.0, ge=0, le=60)
    # Largest request body accepted (bytes); a bigger one is refused with 413.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Host headers accepted (DNS-rebinding protection), comma-separated, "*" for a port wildcard
    # ("127.0.0.1:*"); empty: loopback names only when bound to loopback, any otherwise (behind
    # an ingress that checks the host).
    allowed_hosts: str = ""
