"""Two auth replicas sharing one PostgreSQL database and one keys dir behave as one service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import jwt
import pytest

from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2

pytestmark = pytest.mark.postgres


async def test_replicas_share_keys_clients_and_revocations(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    # Started together on an empty database: one schema, one dev key, one dev client.
    a, b = await asyncio.gather(AuthServer(settings).start(), AuthServer(settings).start())
    try:
        assert len(list(settings.resolved_keys_dir().glob("*.pem"))) == 1
        token = await a.token()
        verify = auth_pb2.VerifyTokenRequest(token=token)
        assert (await b.stub.VerifyToken(verify)).caller.subject == "dev"

        admin = await a.admin()
        rotated = await b.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin)
        fresh = await a.token()
        # a signs with the key b created.
        assert jwt.get_unverified_header(fresh)["kid"] == rotated.active.kid
        await b.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=fresh))

        issued = await a.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id="dev", client_secret=a.dev_credentials()["client_secret"]
            )
        )
        await a.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token_id=issued.token_id), metadata=admin
        )
        assert await code_of(
            b.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=issued.access_token))
        ) == (grpc.StatusCode.UNAUTHENTICATED, "token revoked")

        # Rotations racing on two replicas never leave two active keys.
        results = await asyncio.gather(
            a.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin),
            b.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin),
            return_exceptions=True,
        )
        assert any(isinstance(r, auth_pb2.RotateKeyResponse) for r in results)
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() == grpc.StatusCode.ABORTED
        keys = await a.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin)
        assert sum(k.state == auth_pb2.KEY_STATE_ACTIVE for k in keys.keys) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_concurrent_revocations_on_two_replicas_are_idempotent(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    a, b = await asyncio.gather(AuthServer(settings).start(), AuthServer(settings).start())
    try:
        admin = await a.admin()
        request = auth_pb2.RevokeTokenRequest(token_id="same-jti")
        replies = await asyncio.gather(
            *(replica.stub.RevokeToken(request, metadata=admin) for replica in [a, b] * 10),
            return_exceptions=True,
        )
        assert [r for r in replies if not isinstance(r, auth_pb2.RevokeTokenResponse)] == []
        listing = await b.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
        assert [(r.tenant, r.token_id) for r in listing.revoked_tokens] == [("", "same-jti")]
    finally:
        await a.stop()
        await b.stop()
