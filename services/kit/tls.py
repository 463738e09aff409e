"""Mutual TLS between toolmesh processes.

Inner services trust the caller identity they are given only when it comes from the gateway,
so in production every inner server requires a client certificate signed by the mesh CA, and
``services.kit.peers`` decides per RPC which peer may call. The process's own certificate is
also its client identity: ``configure_client_tls`` makes every channel this process opens
present it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

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
