"""toolmesh tenants and roles against a real auth server, in-process: each change prints the
policy version it made; refusals are one line with the status code."""

from __future__ import annotations

import json

import pytest

from tests.unit.auth.conftest import AuthServer
from tests.unit.cli.test_cli_admin import auth, toolmesh

__all__ = ["auth"]


async def test_tenants_commands(auth: AuthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await toolmesh(capsys, "tenants", "create", "acme", "--allow", "calculator")
    assert (code, err) == (0, "")
    assert out == "acme  tools=calculator  changed_in_version=2\n(policy version 2)\n"
    code, out, _ = await toolmesh(capsys, "tenants", "allow", "acme", "calculator", "lab.*")
    assert code == 0 and "tools=calculator lab.*" in out and "(policy version 3)" in out
    code, out, _ = await toolmesh(capsys, "tenants", "allow", "acme", "lab.*")
    assert code == 0 and "(unchanged, policy version 3)" in out
    code, out, err = await toolmesh(capsys, "tenants", "deny", "acme", "lab.reader")
    assert code == 1 and out == ""
    assert err.startswith("error: FAILED_PRECONDITION: lab.reader stays allowed by lab.*")
    code, out, _ = await toolmesh(capsys, "tenants", "show", "acme", "--json")
    assert json.loads(out)["tenant"]["allowed_tools"] == ["calculator", "lab.*"]
    code, out, _ = await toolmesh(capsys, "tenants", "list")
    assert out.splitlines() == [
        "acme  tools=calculator lab.*  changed_in_version=3",
        "dev  tools=*  changed_in_version=1",
        "(policy version 3)",
    ]
    code, out, err = await toolmesh(capsys, "--json", "tenants", "create", "acme")
    assert code == 1 and json.loads(err)["error"]["code"] == "ALREADY_EXISTS"


async def test_roles_commands(auth: AuthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await toolmesh(capsys, "roles", "set", "auditor", "ops:read")
    assert code == 0 and out == "auditor  scopes=ops:read\n(policy version 2)\n"
    code, out, _ = await toolmesh(capsys, "roles", "list")
    assert "auditor  scopes=ops:read" in out.splitlines() and "(policy version 2)" in out
