"""Mutual TLS between toolmesh processes.

Inner services trust the caller identity they are given only when it comes from the gateway,
so in production every server requires a client certificate signed by the mesh CA and checks
the peer's common name against an allowlist. The process's own certificate is also its client
identity: ``configure_client_tls`` makes every channel this process opens present it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from services.kit import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path) -> TlsFiles:
        return cls(cert=cert.read_bytes(), key=key.read_bytes(), ca=ca.read_bytes())

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


_client_credentials: grpc.ChannelCredentials | None = None


def configure_client_tls(files: TlsFiles | None) -> None:
    """Make every channel this process opens use mTLS with its own certificate."""
    global _client_credentials  # noqa: PLW0603 - one identity per process, set at start-up
    _client_credentials = files.channel_credentials() if files else None


def client_credentials() -> grpc.ChannelCredentials | None:
    return _client_credentials


def peer_common_name(context: aio.ServicerContext) -> str:
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else ""


class PeerAllowlistInterceptor(aio.ServerInterceptor):
    """Refuses calls whose client certificate's common name is not on the allowlist.

    grpc checks the certificate chain; which peers may call is ours to decide. Health and
    reflection stay open to any authenticated peer so probes and operators can use them.
    """

    _OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        if handler_call_details.method.startswith(self._OPEN_PREFIXES):
            return handler
        inner = handler.unary_unary
        allowed = self._allowed

        async def checked(request, context):  # type: ignore[no-untyped-def]
            peer = peer_common_name(context)
            if peer not in allowed:
                await errors.abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"peer {peer or '(no certificate)'} may not call this service",
                )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
