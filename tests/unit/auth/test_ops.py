"""The operator commands take a dev database to one production accepts, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import services.auth
from services.kit.settings import Environment
from tests.unit.auth.conftest import AuthServer, make_settings
from toolmesh.auth.v1 import auth_pb2

ROOT = Path(services.auth.__file__).resolve().parents[2]


def operator(data_dir: Path, *args: str) -> dict[str, str]:
    env = {**os.environ, "TOOLMESH_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "services.auth", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


async def test_bootstrap_production_from_a_dev_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = await AuthServer(make_settings(data)).start()
    dev_kid, _ = server.signing_key()
    await server.stop()

    rotated = operator(data, "rotate-key")
    assert rotated["previous"] == dev_kid
    # "--": a kid is base64url and may start with "-".
    assert operator(data, "retire-key", "--", dev_kid) == {"retired": dev_kid}
    assert operator(data, "delete-client", "dev") == {"deleted": "dev"}
    created = operator(
        data,
        "create-client",
        "--tenant",
        "ops",
        "--role",
        "platform-operator",
        "--client-id",
        "root",
    )
    assert created["client_id"] == "root"

    server = await AuthServer(make_settings(data, env=Environment.PRODUCTION)).start()
    try:
        issued = await server.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id="root",
                client_secret=created["client_secret"],
                scopes=["platform:admin"],
            )
        )
        keys = await server.stub.ListKeys(
            auth_pb2.ListKeysRequest(),
            metadata=[("authorization", f"Bearer {issued.access_token}")],
        )
        assert [(k.kid, k.state) for k in keys.keys if k.state == auth_pb2.KEY_STATE_ACTIVE] == [
            (rotated["active"], auth_pb2.KEY_STATE_ACTIVE)
        ]
    finally:
        await server.stop()
