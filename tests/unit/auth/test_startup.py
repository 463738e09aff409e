"""First start creates dev material with tight file modes; production refuses it."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import grpc
import pytest

from services.auth.store import Store
from services.kit.db import create_engine
from services.kit.server import StartupRefused
from services.kit.settings import Environment
from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_first_start_creates_dev_key_and_client_with_private_modes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await AuthServer(make_settings(tmp_path / "data")).start()
    try:
        keys_dir = server.settings.resolved_keys_dir()
        (key_file,) = keys_dir.glob("*.pem")
        assert mode(keys_dir) == mode(keys_dir.parent) == 0o700
        assert mode(key_file) == 0o600
        creds_file = server.settings.dev_client_file()
        assert mode(creds_file) == 0o600
        creds = server.dev_credentials()
        assert creds["client_id"] == "dev" and creds["tenant"] == "dev"
        assert len(creds["client_secret"]) >= 32
        await server.token()
        logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert creds["client_secret"] not in logged
        assert "created dev client" in logged
        keys = await server.stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=await server.admin())
        assert [(k.kid, k.dev, k.state) for k in keys.keys] == [
            (key_file.stem, True, auth_pb2.KEY_STATE_ACTIVE)
        ]
    finally:
        await server.stop()


async def test_restart_keeps_the_key_and_the_client(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    first = await AuthServer(settings).start()
    creds = first.dev_credentials()
    token = await first.token()
    await first.stop()
    second = await AuthServer(settings).start()
    try:
        assert second.dev_credentials() == creds
        assert len(list(settings.resolved_keys_dir().glob("*.pem"))) == 1
        verified = await second.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token))
        assert verified.caller.subject == "dev"
    finally:
        await second.stop()


async def test_production_refuses_dev_material_until_replaced(tmp_path: Path) -> None:
    dev = make_settings(tmp_path / "data")
    production = make_settings(tmp_path / "data", env=Environment.PRODUCTION)
    with pytest.raises(StartupRefused, match="no active signing key"):
        await AuthServer(make_settings(tmp_path / "empty", env=Environment.PRODUCTION)).start()

    server = await AuthServer(dev).start()
    await server.stop()
    with pytest.raises(StartupRefused, match=r"dev signing key .* rotate-key"):
        await AuthServer(production).start()

    server = await AuthServer(dev).start()
    admin = await server.admin()
    rotated = await server.stub.RotateKey(auth_pb2.RotateKeyRequest(), metadata=admin)
    await server.stub.RetireKey(auth_pb2.RetireKeyRequest(kid=rotated.previous.kid), metadata=admin)
    await server.stop()
    with pytest.raises(StartupRefused, match=r"dev client exists.*delete-client dev"):
        await AuthServer(production).start()

    server = await AuthServer(dev).start()
    await server.stub.DeleteClient(
        auth_pb2.DeleteClientRequest(client_id="dev"), metadata=await server.admin()
    )
    await server.stop()
    server = await AuthServer(production).start()
    try:
        code, _ = await code_of(
            server.stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    client_id="dev", client_secret=server.dev_credentials()["client_secret"]
                )
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop()


async def test_service_info(auth: AuthServer) -> None:
    info = (await auth.stub.GetServiceInfo(auth_pb2.GetServiceInfoRequest())).info
    assert info.service == "auth"
    assert list(info.contract_versions) == ["toolmesh.auth.v1"]
    assert info.build_version
    assert info.started_at.seconds > 0


async def test_start_refused_when_the_signing_key_file_is_missing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    server = await AuthServer(settings).start()
    kid, _ = server.signing_key()
    await server.stop()
    (settings.resolved_keys_dir() / f"{kid}.pem").unlink()
    with pytest.raises(StartupRefused, match=f"signing key {kid} is not readable"):
        await AuthServer(settings).start()


async def test_a_dev_client_of_an_earlier_release_gets_platform_admin(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    server = await AuthServer(settings).start()
    await server.stop()
    engine = create_engine(settings.resolved_database_url())
    try:
        await Store(engine).set_scopes("dev", "tools:read tools:write ops:read admin")
    finally:
        await engine.dispose()
    server = await AuthServer(settings).start()
    try:
        issued = await server.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id="dev", client_secret=server.dev_credentials()["client_secret"]
            )
        )
        assert "platform:admin" in issued.scopes
    finally:
        await server.stop()
