"""Which mesh peers may call which RPC: per-method rules over mutual-TLS identities.

Inner services trust the tenant carried in a request only because only certain peers may send
it: the gateway (and auth, for its own audit events). A service-wide allowlist is not enough —
telemetry must take spans from every process of the mesh but tenant-scoped writes and reads
from the gateway alone — so every RPC a service serves names the roles that may call it, and a
service whose rules leave an RPC out refuses to start (deny by default, checked up front).

A peer's role is its certificate's common name, or what ``peer_aliases`` maps that name to
(for certificates issued with other names, say SPIFFE-style or per-environment ones). The
service-wide ``allowed_peers`` list still applies first. Health and reflection stay open to any
peer the TLS handshake accepted, so probes and operators can use them.

Written here because grpc ships only the handshake: which authenticated peer may call what is
the application's decision.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc import aio

from services.kit import errors
from services.kit.interceptors import drive_stream
from services.kit.logs import LIMITER

log = logging.getLogger("toolmesh.peers")

# Any peer with a certificate from the mesh CA (and on the service-wide allowlist).
ANY_PEER = "*"
# The roles of the mesh: the service names, the operator's tools and the OTel Collector.
GATEWAY = "gateway"
AUTH = "auth"
ROUTER = "router"
MEMORY = "memory"
TELEMETRY = "telemetry"
OPERATOR = "operator"
COLLECTOR = "otel-collector"

# Standard services every server registers; open to any authenticated peer.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class PeerRulesError(ValueError):
    """A service's rules do not cover exactly the RPCs it serves."""


@dataclass(frozen=True)
class PeerRules:
    """Full method name ("/pkg.Service/Method") -> roles that may call it."""

    by_method: Mapping[str, frozenset[str]]

    @classmethod
    def for_service(cls, service: str, rules: Mapping[str, Iterable[str]]) -> PeerRules:
        """Rules for one service, by short method name: ``{"Route": [GATEWAY]}``."""
        return cls({f"/{service}/{method}": frozenset(roles) for method, roles in rules.items()})

    def merged(self, other: PeerRules) -> PeerRules:
        return PeerRules({**self.by_method, **other.by_method})

    def check_covers(self, services: Iterable[str]) -> None:
        """Every RPC of ``services`` has a rule and every rule names a served RPC.

        Services missing from the default descriptor pool (hand-registered generic handlers
        such as OTLP's TraceService) are checked by name only against the rules given.
        """
        served: set[str] = set()
        for name in services:
            if name.startswith(OPEN_PREFIXES[0][1:]) or name.startswith(OPEN_PREFIXES[1][1:]):
                continue
            try:
                descriptor = descriptor_pool.Default().FindServiceByName(name)
            except KeyError:
                served.update(m for m in self.by_method if m.startswith(f"/{name}/"))
                continue
            served.update(f"/{name}/{method.name}" for method in descriptor.methods)
        missing = sorted(served - set(self.by_method))
        unknown = sorted(set(self.by_method) - served)
        if missing or unknown:
            raise PeerRulesError(
                "peer rules must name every served RPC exactly: "
                f"missing {missing or 'none'}, unknown {unknown or 'none'}"
            )

    def allows(self, method: str, role: str) -> bool:
        roles = self.by_method.get(method)
        if roles is None:
            return False
        return ANY_PEER in roles or role in roles


def parse_aliases(text: str) -> dict[str, str]:
    """``"cn-a=gateway,cn-b=auth"`` -> {"cn-a": "gateway", "cn-b": "auth"}."""
    aliases: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, role = item.partition("=")
        if not sep or not name.strip() or not role.strip():
            raise ValueError(f"peer alias {item.strip()!r} is not NAME=ROLE")
        aliases[name.strip()] = role.strip()
    return aliases


def peer_common_name(context: aio.ServicerContext) -> str:
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else ""


def address_of_peer(peer: str) -> str:
    """The host of a grpc peer string, without the port that changes per connection:
    "ipv4:10.0.0.7:51234" -> "10.0.0.7", "ipv6:[::1]:51234" -> "::1"; anything else (a unix
    socket, a bare address) as given."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4" and rest:
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6" and rest:
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return peer


_Unary = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


class PeerAuthorizer(aio.ServerInterceptor):
    """Refuses a call unless the peer is on the allowlist and its role may call the method.

    Installed only when the server requires TLS client certificates; in plaintext development
    mode there is no peer identity to check (the kit refuses that mode in production). Without
    rules (``None``: a public service such as the gateway) only the allowlist, if any, applies.
    """

    def __init__(
        self,
        rules: PeerRules | None,
        allowed_peers: frozenset[str] = frozenset(),
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.rules = rules
        self._allowed = allowed_peers
        self._aliases = dict(aliases or {})

    def role_of(self, common_name: str) -> str:
        return self._aliases.get(common_name, common_name)

    def refusal(self, method: str, common_name: str) -> str | None:
        """Why ``common_name`` may not call ``method``, or None when it may."""
        if method.startswith(OPEN_PREFIXES):
            return None
        if not common_name:
            return "a client certificate is required"
        if self._allowed and common_name not in self._allowed:
            return f"peer {common_name} may not call this service"
        if self.rules is not None and not self.rules.allows(method, self.role_of(common_name)):
            return f"peer {common_name} may not call {method.rsplit('/', 1)[-1]}"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or (self.rules is None and not self._allowed):
            return handler
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return self._wrap_unary(handler, method)
        if handler.unary_stream is not None:
            return self._wrap_unary_stream(handler, method)
        # Client- and bidi-streaming RPCs have no rule form yet: refuse rather than bypass.
        return self._refuse_stream(handler, method)

    def _wrap_unary(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner: _Unary = handler.unary_unary

        async def checked(request: Any, context: aio.ServicerContext) -> Any:
            await self._check(method, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary_stream(
        self, handler: grpc.RpcMethodHandler, method: str
    ) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream

        async def checked(request: Any, context: aio.ServicerContext) -> None:
            await self._check(method, context)
            await drive_stream(inner(request, context), context)

        return grpc.unary_stream_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refuse_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        async def refused(request_iterator: Any, context: aio.ServicerContext) -> Any:
            await errors.abort(
                context, grpc.StatusCode.PERMISSION_DENIED, f"{method} takes no peer calls"
            )

        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                refused,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            refused,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _check(self, method: str, context: aio.ServicerContext) -> None:
        common_name = peer_common_name(context)
        reason = self.refusal(method, common_name)
        if reason is not None:
            LIMITER.log(
                log,
                logging.WARNING,
                f"peer refused {method}",
                "peer refused",
                {"method": method, "peer": common_name or "(none)"},
            )
            await errors.abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
