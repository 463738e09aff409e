"""The admin commands (clients, keys, revoke) against a real auth server, in-process."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.main import main
from services.kit.certs import make_all
from tests.unit.auth.conftest import AuthServer, make_settings
from toolmesh.auth.v1 import auth_pb2


@pytest.fixture
async def auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AuthServer]:
    server = await AuthServer(make_settings(tmp_path)).start()
    assert server.running is not None
    monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOOLMESH_AUTH_TARGET", f"127.0.0.1:{server.running.port}")
    for name in ("TOOLMESH_TOKEN", "TOOLMESH_TLS_CA_FILE", "TOOLMESH_CLI_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    await server.stop()


async def toolmesh(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_clients_lifecycle(auth: AuthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await toolmesh(
        capsys,
        "clients",
        "create",
        "--tenant",
        "acme",
        "--scopes",
        "tools:read tools:write",
        "--roles",
        "reader",
        "--json",
    )
    assert (code, err) == (0, "")
    created = json.loads(out)
    client_id, secret = created["client"]["client_id"], created["client_secret"]
    assert created["client"]["scopes"] == ["tools:read", "tools:write"]
    assert created["client"]["roles"] == ["reader"] and len(secret) >= 32

    code, out, _ = await toolmesh(capsys, "clients", "list")
    assert code == 0 and client_id in out and secret not in out and "tenant=acme" in out

    code, out, _ = await toolmesh(capsys, "clients", "rotate-secret", client_id)
    assert code == 0 and "client_secret: " in out and "shown once" in out
    new_secret = out.split("client_secret: ", 1)[1].split()[0]
    assert new_secret != secret

    code, out, _ = await toolmesh(capsys, "clients", "disable", client_id)
    assert code == 0 and "state=disabled" in out
    code, out, _ = await toolmesh(capsys, "clients", "delete", client_id)
    assert code == 0 and "state=deleted" in out
    code, _, err = await toolmesh(capsys, "clients", "disable", "no-such-client")
    assert code == 1 and err.startswith("error: NOT_FOUND: ") and "Traceback" not in err


async def test_create_can_write_the_secret_to_a_private_file(
    auth: AuthServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "new.secret"
    code, out, _ = await toolmesh(
        capsys,
        "clients",
        "create",
        "--tenant",
        "dev",
        "--scopes",
        "tools:read",
        "--secret-file",
        str(path),
    )
    secret = path.read_text().strip()
    assert code == 0 and secret and secret not in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, _, err = await toolmesh(
        capsys,
        "clients",
        "create",
        "--tenant",
        "dev",
        "--scopes",
        "tools:read",
        "--secret-file",
        str(path),
    )
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ") and "exists" in err


async def test_keys_rotate_retire_and_revoke(
    auth: AuthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await toolmesh(capsys, "keys", "list", "--json")
    (first,) = [k["kid"] for k in json.loads(out)["keys"]]
    code, out, _ = await toolmesh(capsys, "keys", "rotate")
    assert code == 0 and out.startswith("active: ") and f"previous: {first}" in out
    code, out, _ = await toolmesh(capsys, "keys", "retire", "--", first)
    assert code == 0 and first in out and "retired" in out
    code, out, _ = await toolmesh(capsys, "revoke", "--jti", "abc123")
    assert code == 0 and out.strip() == "revoked token abc123"
    with pytest.raises(SystemExit) as exit_:
        main(["revoke", "--jti", "abc123", "--client", "x"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


async def test_a_tenant_admin_works_within_its_tenant_and_the_operator_across(
    auth: AuthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await toolmesh(
        capsys, "clients", "create", "--tenant", "acme", "--roles", "admin", "--json"
    )
    created = json.loads(out)
    await toolmesh(capsys, "clients", "create", "--tenant", "globex", "--scopes", "tools:read")
    acme_admin = (
        await auth.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id=created["client"]["client_id"], client_secret=created["client_secret"]
            )
        )
    ).access_token
    as_acme = ("--token", acme_admin)

    # No --tenant: the token's own tenant.
    code, out, err = await toolmesh(
        capsys, "clients", "create", "--scopes", "tools:read", "--json", *as_acme
    )
    assert (code, err) == (0, "") and json.loads(out)["client"]["tenant"] == "acme"
    code, out, _ = await toolmesh(capsys, "clients", "list", *as_acme)
    assert code == 0 and "tenant=globex" not in out and out.count("tenant=acme") == 2
    for args in (
        ("clients", "list", "--tenant", "globex"),
        ("clients", "create", "--tenant", "globex", "--scopes", "tools:read"),
    ):
        code, out, err = await toolmesh(capsys, *args, *as_acme)
        assert (code, out, err) == (
            1,
            "",
            "error: PERMISSION_DENIED: scope platform:admin required to act on another tenant\n",
        )
    code, _, err = await toolmesh(capsys, "keys", "list", *as_acme)
    assert err == "error: PERMISSION_DENIED: scope platform:admin required\n"
    code, _, err = await toolmesh(
        capsys, "clients", "create", "--scopes", "platform:admin", *as_acme
    )
    assert code == 1 and err.startswith("error: PERMISSION_DENIED: cannot grant platform:admin")

    # The platform operator (the dev client): one tenant, or every tenant.
    code, out, _ = await toolmesh(capsys, "clients", "list", "--tenant", "globex")
    assert code == 0 and "tenant=globex" in out and "tenant=acme" not in out
    code, out, _ = await toolmesh(capsys, "clients", "list")
    assert {"tenant=dev", "tenant=acme", "tenant=globex"} <= set(out.split())
    code, out, _ = await toolmesh(capsys, "revoke", "--jti", "abc123", "--tenant", "globex")
    assert code == 0 and out.strip() == "revoked token abc123"
    code, _, err = await toolmesh(capsys, "revoke", "--client", "x", "--tenant", "globex")
    assert code == 1 and "--tenant goes with --jti" in err


async def test_caller_token_decides_and_errors_are_one_line(
    auth: AuthServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = await auth.token(("tools:read",))
    code, out, err = await toolmesh(capsys, "clients", "list", "--token", reader)
    assert (code, out, err) == (1, "", "error: PERMISSION_DENIED: scope admin required\n")
    monkeypatch.setenv("TOOLMESH_TOKEN", "not-a-jwt")
    code, _, err = await toolmesh(capsys, "keys", "list")
    assert code == 1 and err.startswith("error: UNAUTHENTICATED: ") and "not-a-jwt" not in err


async def test_tls_options(
    auth: AuthServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = await toolmesh(capsys, "keys", "list", "--ca-file", str(tmp_path / "none"))
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: cannot read --ca-file")
    code, _, err = await toolmesh(capsys, "keys", "list", "--cert-file", "x.pem")
    assert code == 1 and "--cert-file and --key-file go together" in err


async def test_mutual_tls_as_the_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "certs"
    make_all(certs)
    settings = make_settings(
        tmp_path / "data",
        tls_cert_file=certs / "auth.pem",
        tls_key_file=certs / "auth.key",
        tls_ca_file=certs / "ca.pem",
        allowed_peers="operator",
    )
    server = AuthServer(settings)
    cleanups_server = await server.start()
    assert cleanups_server.running is not None
    try:
        monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.delenv("TOOLMESH_TOKEN", raising=False)
        monkeypatch.setenv("TOOLMESH_CLI_TLS_CA_FILE", str(certs / "ca.pem"))
        monkeypatch.setenv("TOOLMESH_CLI_TLS_CERT_FILE", str(certs / "operator.pem"))
        monkeypatch.setenv("TOOLMESH_CLI_TLS_KEY_FILE", str(certs / "operator.key"))
        target = f"127.0.0.1:{cleanups_server.running.port}"
        code, out, err = await toolmesh(capsys, "keys", "list", "--auth-target", target)
        assert (code, err) == (0, "") and "EdDSA" in out
        code, _, err = await toolmesh(
            capsys,
            "keys",
            "list",
            "--auth-target",
            target,
            "--cert-file",
            str(certs / "router.pem"),
            "--key-file",
            str(certs / "router.key"),
        )
        assert code == 1 and err.startswith("error: PERMISSION_DENIED: peer router")
    finally:
        await server.stop()
