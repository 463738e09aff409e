"""JWKS contents and key rotation: old tokens verify until their key is retired."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import grpc
import jwt

from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2


async def jwks_kids(auth: AuthServer) -> list[str]:
    jwks = json.loads((await auth.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
    for key in jwks["keys"]:
        assert set(key) == {"kty", "crv", "x", "kid", "alg", "use"}
    return sorted(key["kid"] for key in jwks["keys"])


async def test_rotate_then_retire(auth: AuthServer) -> None:
    admin = await auth.admin()
    old_kid, _ = auth.signing_key()
    old_token = await auth.token()
    assert await jwks_kids(auth) == [old_kid]

    rotated = await auth.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin)
    new_kid = rotated.active.kid
    assert rotated.previous.kid == old_kid
    assert rotated.previous.state == auth_pb2.KEY_STATE_VERIFYING
    assert rotated.active.state == auth_pb2.KEY_STATE_ACTIVE and not rotated.active.dev
    new_file = auth.settings.resolved_keys_dir() / f"{new_kid}.pem"
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o600
    assert await jwks_kids(auth) == sorted([old_kid, new_kid])

    old = auth_pb2.VerifyTokenRequest(token=old_token)
    assert (await auth.stub.VerifyToken(old)).caller.subject == "dev"
    new_token = await auth.token()
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    await auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=new_token))

    code, details = await code_of(
        auth.stub.RetireKey(auth_pb2.RetireKeyRequest(kid=new_kid), metadata=admin)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rotate first" in details

    retired = await auth.stub.RetireKey(auth_pb2.RetireKeyRequest(kid=old_kid), metadata=admin)
    assert retired.key.state == auth_pb2.KEY_STATE_RETIRED
    assert await jwks_kids(auth) == [new_kid]
    assert await code_of(auth.stub.VerifyToken(old)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown signing key",
    )
    assert not (auth.settings.resolved_keys_dir() / f"{old_kid}.pem").exists()
    # The admin token was signed by the retired key too.
    assert (await code_of(auth.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin)))[
        0
    ] == grpc.StatusCode.UNAUTHENTICATED
    admin = await auth.admin()
    listed = await auth.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin)
    assert {(k.kid, k.state) for k in listed.keys} == {
        (new_kid, auth_pb2.KEY_STATE_ACTIVE),
        (old_kid, auth_pb2.KEY_STATE_RETIRED),
    }

    code, _ = await code_of(
        auth.stub.RetireKey(auth_pb2.RetireKeyRequest(kid="nope"), metadata=admin)
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_rotated_key_is_published_before_it_signs(tmp_path: Path) -> None:
    server = await AuthServer(make_settings(tmp_path / "data", key_publish_ahead_s=2)).start()
    try:
        old_kid, _ = server.signing_key()
        rotated = await server.stub.RotateKey(
            auth_pb2.RotateKeyRequest(), metadata=await server.admin()
        )
        new_kid = rotated.active.kid
        signs_from = rotated.active.signs_from.ToNanoseconds() / 1e9
        assert rotated.active.signs_from.ToNanoseconds() > rotated.active.created_at.ToNanoseconds()
        assert await jwks_kids(server) == sorted([old_kid, new_kid])
        # Judged by each token's own iat against signs_from, not by how long the calls took:
        # the old key signs until signs_from, the new one from then on (iat is in whole
        # seconds, so within signs_from's own second either may sign).
        seen: list[str] = []
        while new_kid not in seen:
            token = await server.token()
            kid, iat = jwt.get_unverified_header(token)["kid"], _claims(token)["iat"]
            if iat + 1 <= signs_from:
                assert kid == old_kid, (kid, iat, signs_from)
            elif iat >= signs_from:
                assert kid == new_kid, (kid, iat, signs_from)
            seen.append(kid)
            await asyncio.sleep(0.2)
        assert seen[0] == old_kid, "the new key signed before it was published for a while"
    finally:
        await server.stop()


def _claims(token: str) -> dict[str, int]:
    claims: dict[str, int] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_rotate_key_says_so_when_the_keys_dir_is_not_writable(auth: AuthServer) -> None:
    admin = await auth.admin()
    keys_dir = auth.settings.resolved_keys_dir()
    keys_dir.rename(keys_dir.with_name("moved"))
    keys_dir.write_text("not a directory")  # stands in for a read-only secret mount
    code, details = await code_of(auth.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rotate-key" in details
    listed = await auth.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=admin)
    assert len(listed.keys) == 1
