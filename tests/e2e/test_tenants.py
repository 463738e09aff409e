"""Tenants by API on a real mesh with two gateway replicas: a tenant created with
`toolmesh tenants create` can Run at once (no restart) on every replica, a denied tool is
refused, every change is a new policy version named in the gateways' decision logs and in the
audit trail. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from gateway.settings import GatewaySettings
from testing.mesh import Mesh
from tests.e2e.conftest import DB_SERVICES, bearer
from tests.e2e.test_security import cli, create_client, dev_token, issue, ok
from tests.pgutil import fresh_databases
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.e2e

GATEWAYS = ("gateway", "gateway-1")
# Each gateway polls auth this often: a change must be in force on every replica by then
# (plus the time a Run takes on a loaded machine).
REFRESH_S = GatewaySettings.model_fields["auth_refresh_s"].default
BOUND_S = REFRESH_S + 5.0


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    data_dir: Path = tmp_path_factory.mktemp(f"tenants-{request.param}")
    replicas = {"gateway": 2}
    if request.param == "postgres":
        with fresh_databases(*DB_SERVICES) as urls:
            yield from _running(
                Mesh(data_dir=data_dir, database_urls=urls, tls=True, replicas=replicas)
            )
    else:
        yield from _running(Mesh(data_dir=data_dir, tls=True, replicas=replicas))


def _running(mesh: Mesh) -> Iterator[Mesh]:
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


def _run(mesh: Mesh, instance: str, token: str) -> gateway_pb2.RunResponse:
    with mesh.channel(instance) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).Run(
            gateway_pb2.RunRequest(session_id=f"t-{uuid.uuid4().hex[:8]}", prompt="what is 2 + 2"),
            metadata=bearer(token),
            timeout=20,
        )


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _until(want: grpc.StatusCode, call: Callable[[], object]) -> float:
    """Seconds until ``call`` answers ``want``; fails past BOUND_S."""
    start = time.monotonic()
    while True:
        code = _code(call)
        elapsed = time.monotonic() - start
        if code == want:
            return elapsed
        assert elapsed < BOUND_S, f"still {code} after {elapsed:.1f}s"
        time.sleep(0.2)


def test_a_tenant_created_by_api_runs_on_every_replica_at_once(mesh: Mesh) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    client_id, secret = create_client(mesh, tenant, scopes="tools:read tools:write")
    token = issue(mesh, client_id, secret)
    # Not in the policy yet: refused everywhere.
    for instance in GATEWAYS:
        assert _code(partial(_run, mesh, instance, token)) == grpc.StatusCode.PERMISSION_DENIED

    created = json.loads(
        ok(cli(mesh, "tenants", "create", tenant, "--allow", "calculator", "--json"))
    )
    version = int(created["policy_version"])
    assert created["tenant"]["allowed_tools"] == ["calculator"]
    waits = {}
    for instance in GATEWAYS:
        waits[instance] = _until(grpc.StatusCode.OK, partial(_run, mesh, instance, token))
        assert _run(mesh, instance, token).tool_name == "calculator"
    print(f"pickup after create (s): {waits}")

    # Every decision names the version it was made under.
    for instance in GATEWAYS:
        decisions = [
            r
            for r in mesh.log_records(instance)
            if r.get("message") == "authorization" and r.get("tenant") == tenant
        ]
        assert decisions and decisions[-1]["policy_version"] == str(version)
        assert decisions[-1]["decision"] == "allow"

    denied = json.loads(ok(cli(mesh, "tenants", "deny", tenant, "calculator", "--json")))
    assert int(denied["policy_version"]) == version + 1 and denied["changed"]
    for instance in GATEWAYS:
        _until(grpc.StatusCode.PERMISSION_DENIED, partial(_run, mesh, instance, token))

    shown = json.loads(ok(cli(mesh, "tenants", "show", tenant, "--json")))
    assert shown["tenant"]["allowed_tools"] == [] and int(shown["policy_version"]) == version + 1

    # Both changes reached the audit trail, with the version each made (the platform operator
    # acted on another tenant, so the dev tenant's trail has them too).
    admin = dev_token(mesh)
    deadline = time.monotonic() + 30
    while True:
        with mesh.channel("gateway") as channel:
            events = [
                stored.event
                for stored in gateway_pb2_grpc.GatewayStub(channel)
                .ListAudit(gateway_pb2.ListAuditRequest(limit=1000), metadata=bearer(admin))
                .events
                if stored.event.target == tenant
            ]
        found = {(e.action, e.policy_version) for e in events}
        if {
            ("admin.tenant.create", str(version)),
            ("admin.tenant.deny", str(version + 1)),
        } <= found or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert ("admin.tenant.create", str(version)) in found
    assert ("admin.tenant.deny", str(version + 1)) in found

    # Allowed again, another tool only: each replica lists exactly that one within the bound.
    allowed = json.loads(ok(cli(mesh, "tenants", "allow", tenant, "unit_convert", "--json")))
    assert int(allowed["policy_version"]) == version + 2
    for instance in GATEWAYS:
        _until(grpc.StatusCode.OK, partial(_run, mesh, instance, token))
        with mesh.channel(instance) as channel:
            tools = gateway_pb2_grpc.GatewayStub(channel).ListTools(
                gateway_pb2.ListToolsRequest(), metadata=bearer(token), timeout=10
            )
        assert [t.name for t in tools.tools] == ["unit_convert"]


def test_a_tenant_admin_cannot_create_tenants_nor_touch_another(mesh: Mesh) -> None:
    tenant = f"beta-{uuid.uuid4().hex[:6]}"
    ok(cli(mesh, "tenants", "create", tenant))
    client_id, secret = create_client(mesh, tenant, roles="admin")
    token = issue(mesh, client_id, secret)
    refused = cli(mesh, "tenants", "create", f"other-{tenant}", token=token)
    assert refused.returncode == 1
    assert refused.stderr == "error: PERMISSION_DENIED: scope platform:admin required\n"
    other = cli(mesh, "tenants", "allow", "dev", "calculator", token=token)
    assert other.stderr.startswith("error: PERMISSION_DENIED: "), other.stderr
    own = cli(mesh, "tenants", "allow", tenant, "calculator", token=token)
    assert own.returncode == 0, own.stderr
    assert "tools=calculator" in own.stdout
    listed = cli(mesh, "tenants", "list", token=token).stdout
    assert tenant in listed and "dev " not in listed
