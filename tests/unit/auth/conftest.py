"""Real auth servers in-process on port 0 against a temp data dir, and helpers to call them."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.app import build
from services.auth.settings import PACKAGED_POLICY, AuthSettings
from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc


def make_settings(data_dir: Path, **overrides: Any) -> AuthSettings:
    policy = data_dir / "policy.toml"
    if not policy.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        policy.write_text(PACKAGED_POLICY.read_text())
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "otlp_endpoint": "",
        "metrics_port": 0,
        "policy_file": policy,
        "policy_check_interval_s": 0,
        # Nothing listens there: audit events wait in the outbox unless a test starts telemetry.
        "telemetry_target": "127.0.0.1:9",
    }
    values.update(overrides)
    return AuthSettings(**values)


class AuthServer:
    """One auth replica plus a stub; stop() drains and disposes the engine."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.running: Running | None = None

    async def start(self) -> AuthServer:
        cleanups: list[Cleanup] = []
        self.running = await start(self.settings, build(self.settings, cleanups))
        self.running.cleanups.extend(cleanups)
        self.channel = open_channel(f"127.0.0.1:{self.running.port}")
        self.stub = auth_pb2_grpc.AuthStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.running is not None:
            await self.channel.close()
            await self.running.stop(0)
            self.running = None

    def dev_credentials(self) -> dict[str, str]:
        return json.loads(self.settings.dev_client_file().read_text())

    async def token(self, scopes: tuple[str, ...] = ()) -> str:
        creds = self.dev_credentials()
        response = await self.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id=creds["client_id"], client_secret=creds["client_secret"], scopes=scopes
            )
        )
        return response.access_token

    async def admin(self) -> list[tuple[str, str]]:
        return bearer(await self.token())

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The first start's key, read from the keys dir as a replica would."""
        (path,) = self.settings.resolved_keys_dir().glob("*.pem")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return path.stem, key


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a well-formed token for the dev client; None drops a claim."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": "toolmesh-auth",
        "aud": "toolmesh",
        "sub": "dev",
        "tenant": "dev",
        "scope": "tools:read",
        "roles": [],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def sign(payload: dict[str, Any], key: Ed25519PrivateKey, kid: str, **header: Any) -> str:
    return jwt.encode(
        payload, key, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt", **header}
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """Await a call expected to fail; its status code and details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[AuthServer]:
    server = await AuthServer(make_settings(tmp_path / "data")).start()
    try:
        yield server
    finally:
        await server.stop()
