"""Client secrets: generated here, stored only as argon2id hashes, checked off the event loop."""

from __future__ import annotations

import asyncio
import os
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import SecretStr


class SecretHasher:
    """argon2id hashing off the event loop: one verification costs about 100 ms of CPU.

    At most one hash per core runs at a time; the rest queue here rather than fill the default
    thread pool that other blocking work shares.
    """

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        # Unknown client ids are checked against this so they cost as long as a wrong secret.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(32))
        self._slots = asyncio.Semaphore(os.cpu_count() or 2)

    async def hash(self, secret: SecretStr) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, secret.get_secret_value())

    async def matches(self, secret_hash: str, secret: SecretStr) -> bool:
        """Whether ``secret`` matches; an empty hash (unknown, revoked or deleted client) is
        checked against the decoy, so every refusal costs the same time, and never matches."""

        def check() -> bool:
            try:
                return bool(
                    self._hasher.verify(secret_hash or self._decoy, secret.get_secret_value())
                )
            except (VerificationError, InvalidHashError):
                return False

        async with self._slots:
            return await asyncio.to_thread(check) and bool(secret_hash)


def new_secret() -> SecretStr:
    """32 random bytes, URL-safe: shown to the caller once, never stored in clear."""
    return SecretStr(secrets.token_urlsafe(32))
