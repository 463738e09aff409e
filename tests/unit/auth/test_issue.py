"""IssueToken: client credentials in, a signed EdDSA JWT with every claim out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2


async def test_issued_token_verifies_against_jwks_with_every_claim(auth: AuthServer) -> None:
    creds = auth.dev_credentials()
    response = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            client_id="dev", client_secret=creds["client_secret"], scopes=["tools:read"]
        )
    )
    assert response.token_type == "Bearer"
    assert response.expires_in == 900
    assert list(response.scopes) == ["tools:read"]
    jwks = json.loads((await auth.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
    header = jwt.get_unverified_header(response.access_token)
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert {k: jwk[k] for k in ("kty", "crv", "alg", "use")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
    }
    key = jwt.PyJWK.from_dict(jwk).key
    payload = jwt.decode(
        response.access_token,
        key,
        algorithms=["EdDSA"],
        audience="toolmesh",
        issuer="toolmesh-auth",
    )
    assert payload["sub"] == "dev" and payload["tenant"] == "dev"
    assert payload["scope"] == "tools:read"
    assert payload["roles"] == ["admin"]
    assert payload["jti"] == response.token_id and len(payload["jti"]) == 32
    assert payload["exp"] - payload["iat"] == 900
    assert payload["nbf"] == payload["iat"]
    assert abs(payload["iat"] - time.time()) < 5


async def test_empty_scopes_means_every_granted_scope(auth: AuthServer) -> None:
    creds = auth.dev_credentials()
    response = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="dev", client_secret=creds["client_secret"])
    )
    assert set(response.scopes) == {
        "tools:read",
        "tools:write",
        "ops:read",
        "admin",
        "platform:admin",
    }


async def test_wrong_secret_and_unknown_client_get_the_same_answer(
    auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = await code_of(
        auth.stub.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="dev", client_secret="not-the-secret")
        )
    )
    unknown = await code_of(
        auth.stub.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="nobody", client_secret="not-the-secret")
        )
    )
    assert wrong == unknown == (grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
    assert "not-the-secret" not in "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records
    )


async def test_scope_not_granted_is_refused_by_name(auth: AuthServer) -> None:
    creds = auth.dev_credentials()
    code, details = await code_of(
        auth.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id="dev",
                client_secret=creds["client_secret"],
                scopes=["tools:read", "billing"],
            )
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "billing" in details


@pytest.mark.parametrize("how", ["DisableClient", "RevokeClient", "DeleteClient"])
async def test_a_client_that_may_not_get_tokens_answers_like_a_wrong_secret(
    auth: AuthServer, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    admin = await auth.admin()
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant="dev", scopes=["tools:read"]), metadata=admin
    )
    client_id = created.client.client_id
    request = auth_pb2.IssueTokenRequest(client_id=client_id, client_secret=created.client_secret)
    await auth.stub.IssueToken(request)
    wrong = auth_pb2.IssueTokenRequest(client_id=client_id, client_secret="not-the-secret")
    wrong_answer = await code_of(auth.stub.IssueToken(wrong))
    change = getattr(auth.stub, how)
    await change(getattr(auth_pb2, f"{how}Request")(client_id=client_id), metadata=admin)
    right_answer = await code_of(auth.stub.IssueToken(request))
    assert (
        right_answer
        == wrong_answer
        == (
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid client credentials",
        )
    )
    # The audit has the real reason.
    reasons = [
        r.__dict__["details"]["reason"]
        for r in caplog.records
        if r.__dict__.get("event") == "auth.failure"
    ]
    state = {"DisableClient": "disabled", "RevokeClient": "revoked", "DeleteClient": "deleted"}
    assert reasons == ["wrong secret", f"client {state[how]}"]


async def test_repeated_wrong_secrets_are_throttled(tmp_path: Path) -> None:
    server = await AuthServer(make_settings(tmp_path / "data", throttle_failures=3)).start()
    try:
        bad = auth_pb2.IssueTokenRequest(client_id="dev", client_secret="guess")
        for _ in range(3):
            assert (await code_of(server.stub.IssueToken(bad)))[
                0
            ] == grpc.StatusCode.UNAUTHENTICATED
        good = auth_pb2.IssueTokenRequest(
            client_id="dev", client_secret=server.dev_credentials()["client_secret"]
        )
        with_right_secret = server.stub.IssueToken(good)
        try:
            await with_right_secret
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = await rpc_status.aio.from_call(with_right_secret)
            assert status is not None
            info = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info)
            assert info.retry_delay.seconds > 0
        else:
            raise AssertionError("throttled client got a token")
        # Other client ids are not affected.
        assert (
            await code_of(
                server.stub.IssueToken(
                    auth_pb2.IssueTokenRequest(client_id="other", client_secret="x")
                )
            )
        )[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop()


async def test_a_burst_of_concurrent_guesses_is_throttled_too(tmp_path: Path) -> None:
    server = await AuthServer(make_settings(tmp_path / "data", throttle_failures=3)).start()
    try:
        bad = auth_pb2.IssueTokenRequest(client_id="dev", client_secret="guess")
        codes = await asyncio.gather(*(code_of(server.stub.IssueToken(bad)) for _ in range(12)))
        assert sum(c == grpc.StatusCode.UNAUTHENTICATED for c, _ in codes) == 3
        assert sum(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c, _ in codes) == 9
    finally:
        await server.stop()


async def test_invalid_arguments_name_the_field(auth: AuthServer) -> None:
    call = auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="", client_secret="x" * 300, scopes=["BAD SCOPE"])
    )
    code, _ = await code_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    fields = [v.field for v in bad_request.field_violations]
    assert fields == ["client_id", "client_secret", "scopes[0]"]
