"""Ed25519 signing keys: generation, RFC 7638 key ids, private key files, JWKs.

Where keys live, and why: every replica must sign with the active key, so the private key is a
PEM file ``<keys_dir>/<kid>.pem`` (mode 0600, directory 0700) on storage all replicas mount
(a shared volume, or a secret projected into each pod), while the key's metadata, state and
public half live in the shared database. The database decides which key is active; a replica
loads that key's file on first use. Private keys never enter the database, so a database dump
or backup cannot forge tokens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("toolmesh.auth.keys")

ALG = "EdDSA"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_x(key: Ed25519PublicKey) -> str:
    return b64url(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def thumbprint(x: str) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(kid: str, x: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": ALG, "use": "sig"}


def public_key_from_x(x: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(b64url_decode(x))


class KeyFiles:
    """Private key files in one directory, cached once loaded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, Ed25519PrivateKey] = {}

    def path(self, kid: str) -> Path:
        return self.directory / f"{kid}.pem"

    def create(self) -> tuple[str, str]:
        """Generate a key, write its file (0600) and return (kid, public x)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        key = Ed25519PrivateKey.generate()
        x = public_x(key.public_key())
        kid = thumbprint(x)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: never overwrite a key; 0600 from the first byte, not chmod after writing.
        fd = os.open(self.path(kid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        self._cache[kid] = key
        return kid, x

    def load(self, kid: str, expected_x: str) -> Ed25519PrivateKey:
        """The private key for ``kid``; refuses a file whose public half is not the recorded one."""
        cached = self._cache.get(kid)
        if cached is not None:
            return cached
        path = self.path(kid)
        if path.stat().st_mode & 0o077:
            log.warning("private key file readable by others", extra={"path": str(path)})
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey) or public_x(loaded.public_key()) != expected_x:
            raise ValueError(f"key file {path} does not hold key {kid}")
        self._cache[kid] = loaded
        return loaded

    def remove(self, kid: str) -> None:
        """Delete a retired key's file; best effort, the key can no longer sign anyway."""
        self._cache.pop(kid, None)
        try:
            self.path(kid).unlink(missing_ok=True)
        except OSError as error:
            log.warning(
                "could not delete retired key file", extra={"kid": kid, "error": error.strerror}
            )
