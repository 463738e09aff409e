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


class TlsFilesError(ValueError):
    """One of the three files is missing, unreadable, not PEM, or does not match the others."""

    def __init__(self, field: str, message: str, expected: str) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected


def _read(field: str, path: Path, expected: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFilesError(field, f"cannot read {path}: {error.strerror}", expected) from None


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path) -> TlsFiles:
        """Read and check the files: grpc would only fail later, with a vaguer message.

        cryptography (about 10 MB) is imported here, so a process without TLS never loads it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert_pem = _read("tls_cert_file", cert, "a PEM certificate")
        key_pem = _read("tls_key_file", key, "the PEM private key of the certificate")
        ca_pem = _read("tls_ca_file", ca, "the PEM certificate of the mesh CA")
        try:
            leaf = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise TlsFilesError(
                "tls_cert_file", f"{cert} is not a PEM certificate", "a PEM certificate"
            ) from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsFilesError(
                "tls_key_file",
                f"{key} is not an unencrypted PEM private key",
                "the PEM private key of the certificate",
            ) from None
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise TlsFilesError(
                "tls_ca_file",
                f"{ca} holds no PEM certificate",
                "the PEM certificate of the mesh CA",
            ) from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if private.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(
            der, public
        ):
            raise TlsFilesError(
                "tls_key_file",
                f"{key} is not the private key of {cert}",
                "the PEM private key of the certificate",
            )
        return cls(cert=cert_pem, key=key_pem, ca=ca_pem)

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
