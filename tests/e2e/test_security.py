"""Authentication and authorization end to end: the real five processes, mutual TLS on.

Tokens are forged here with the auth service's own private key (read from its keys dir) so that
only the claim under test is wrong; the gateway must refuse every one of them with
UNAUTHENTICATED. Admin changes go through the ``toolmesh`` CLI as the ``operator`` identity.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import make_url

from testing.mesh import REPO, SERVICES, Mesh
from tests.e2e.conftest import bearer
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.e2e

TOOLMESH = str(Path(sys.executable).parent / "toolmesh")
# The gateway polls auth every auth_refresh_s (5 s) and each poll may take up to its fetch
# timeout (2 s) on either side: a revocation or retirement is enforced within 9 s.
REFRESH_S = 5.0
FETCH_TIMEOUT_S = 2.0
BOUND_S = REFRESH_S + 2 * FETCH_TIMEOUT_S
READ = "what is 2 + 2"
WRITE = "save a note: order more coffee"

# Every full token, secret and key that the tests handle, for the hygiene check at the end.
SEEN_SECRETS: set[str] = set()


# --- helpers ------------------------------------------------------------------------------


def cli(mesh: Mesh, *args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``toolmesh`` against the mesh as the ``operator`` certificate (mutual TLS)."""
    env = mesh.env()
    env["TOOLMESH_TARGET"] = mesh.gateway
    env["TOOLMESH_AUTH_TARGET"] = mesh.target("auth")
    if mesh.tls:
        env["TOOLMESH_CLI_TLS_CA_FILE"] = str(mesh.certs / "ca.pem")
        env["TOOLMESH_CLI_TLS_CERT_FILE"] = str(mesh.certs / "operator.pem")
        env["TOOLMESH_CLI_TLS_KEY_FILE"] = str(mesh.certs / "operator.key")
    if token:
        env["TOOLMESH_TOKEN"] = token
    return subprocess.run(
        [TOOLMESH, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def create_client(mesh: Mesh, tenant: str, scopes: str = "", roles: str = "") -> tuple[str, str]:
    args = ["clients", "create", "--tenant", tenant, "--json"]
    if scopes:
        args += ["--scopes", scopes]
    if roles:
        args += ["--roles", roles]
    created = json.loads(ok(cli(mesh, *args)))
    SEEN_SECRETS.add(created["client_secret"])
    return created["client"]["client_id"], created["client_secret"]


def issue(mesh: Mesh, client_id: str, secret: str, scopes: tuple[str, ...] = ()) -> str:
    with mesh.channel("gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).IssueToken(
            gateway_pb2.IssueTokenRequest(
                client_id=client_id, client_secret=secret, scopes=list(scopes)
            ),
            timeout=10,
        )
    SEEN_SECRETS.add(reply.access_token)
    return str(reply.access_token)


def dev_token(mesh: Mesh, scopes: tuple[str, ...] = ()) -> str:
    token = mesh.token(scopes)
    SEEN_SECRETS.add(token)
    return token


def list_tools(mesh: Mesh, token: str | None) -> grpc.StatusCode:
    """The status of a ListTools call with this bearer token (None: no metadata at all)."""
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            stub.ListTools(
                gateway_pb2.ListToolsRequest(),
                metadata=bearer(token) if token is not None else None,
                timeout=10,
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def refused_within(mesh: Mesh, tokens: list[str], bound: float) -> float:
    """Seconds until the gateway refuses every token; fails past ``bound``."""
    start = time.monotonic()
    pending = list(tokens)
    while pending:
        pending = [t for t in pending if list_tools(mesh, t) != grpc.StatusCode.UNAUTHENTICATED]
        elapsed = time.monotonic() - start
        assert elapsed <= bound, f"{len(pending)} token(s) still accepted after {elapsed:.1f}s"
        if pending:
            time.sleep(0.2)
    return time.monotonic() - start


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


class Forger:
    """Re-signs a real token's claims, changed, with the mesh's own active private key."""

    def __init__(self, mesh: Mesh) -> None:
        self.template = dev_token(mesh, ("tools:read",))
        self.header = jwt.get_unverified_header(self.template)
        self.claims = jwt.decode(self.template, options={"verify_signature": False})
        pem = (mesh.data_dir / "auth" / "keys" / f"{self.header['kid']}.pem").read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, Ed25519PrivateKey)
        self.key = key

    def token(
        self,
        header: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        key: Ed25519PrivateKey | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {**self.claims, "iat": now, "nbf": now, "exp": now + 600, "jti": uuid.uuid4().hex}
        body.update(claims)
        for name in drop:
            body.pop(name)
        token = compact({**self.header, **(header or {})}, body, (key or self.key).sign)
        SEEN_SECRETS.add(token)
        return token


def hs256_with_public_key(forger: Forger) -> str:
    public = forger.key.public_key()
    secret = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def sign(data: bytes) -> bytes:
        mac = hmac.HMAC(secret, hashes.SHA256())
        mac.update(data)
        return mac.finalize()

    now = int(time.time())
    claims = {**forger.claims, "iat": now, "nbf": now, "exp": now + 600}
    return compact({**forger.header, "alg": "HS256"}, claims, sign)


def alg_none(forger: Forger) -> str:
    now = int(time.time())
    claims = {**forger.claims, "iat": now, "nbf": now, "exp": now + 600}
    return compact({**forger.header, "alg": "none"}, claims, lambda _: b"")


NEGATIVE: dict[str, Callable[[Forger], str | None]] = {
    "no token": lambda f: None,
    "empty bearer": lambda f: "",
    "garbage": lambda f: "not-a-jwt",
    "three garbage parts": lambda f: "eyJhbGciOi.eyJzdWIiOi.c2ln",
    "alg none": alg_none,
    "HS256 with the public key": hs256_with_public_key,
    "unknown key": lambda f: f.token(
        header={"kid": "k-unknown-" + uuid.uuid4().hex[:8]}, key=Ed25519PrivateKey.generate()
    ),
    "known kid, other key": lambda f: f.token(key=Ed25519PrivateKey.generate()),
    "expired": lambda f: f.token(
        iat=int(time.time()) - 900, nbf=int(time.time()) - 900, exp=int(time.time()) - 120
    ),
    "not yet valid": lambda f: f.token(nbf=int(time.time()) + 300),
    "issued in the future": lambda f: f.token(
        iat=int(time.time()) + 300, nbf=int(time.time()) + 300, exp=int(time.time()) + 900
    ),
    "wrong issuer": lambda f: f.token(iss="https://evil.example"),
    "wrong audience": lambda f: f.token(aud="someone-else"),
    "missing exp": lambda f: f.token(drop=("exp",)),
    "missing jti": lambda f: f.token(drop=("jti",)),
    "missing tenant": lambda f: f.token(drop=("tenant",)),
    "empty tenant": lambda f: f.token(tenant=""),
    "lifetime over the cap": lambda f: f.token(exp=int(time.time()) + 7200),
    "wrong typ": lambda f: f.token(header={"typ": "JWT"}),
    # Over the gateway's 8 KiB cap, under the 32 KiB the transport lets through.
    "oversized": lambda f: f.token(pad="x" * 9000),
    "much oversized": lambda f: f.token(pad="x" * 20000),
}


# --- tests on the shared mesh (SQLite and PostgreSQL) --------------------------------------


@pytest.fixture(scope="module")
def forger(mesh: Mesh) -> Forger:
    return Forger(mesh)


def test_forged_and_broken_tokens_are_unauthenticated(mesh: Mesh, forger: Forger) -> None:
    # The template itself is accepted: only the change under test makes a token fail.
    assert list_tools(mesh, forger.template) == grpc.StatusCode.OK
    assert list_tools(mesh, forger.token()) == grpc.StatusCode.OK
    codes = {name: list_tools(mesh, make(forger)) for name, make in NEGATIVE.items()}
    assert codes == dict.fromkeys(NEGATIVE, grpc.StatusCode.UNAUTHENTICATED)


def test_revoked_jti_client_and_disabled_client_refused_within_bound(mesh: Mesh) -> None:
    jti_token = dev_token(mesh, ("tools:read",))
    other = dev_token(mesh, ("tools:read",))
    revoked_id, revoked_secret = create_client(mesh, "dev", scopes="tools:read")
    disabled_id, disabled_secret = create_client(mesh, "dev", scopes="tools:read")
    secret_file = mesh.data_dir / f"{revoked_id}.secret"
    secret_file.write_text(revoked_secret + "\n")
    by_revoked = ok(
        cli(mesh, "token", "--client-id", revoked_id, "--client-secret-file", str(secret_file))
    ).strip()
    SEEN_SECRETS.add(by_revoked)
    assert jwt.decode(by_revoked, options={"verify_signature": False})["sub"] == revoked_id
    by_disabled = issue(mesh, disabled_id, disabled_secret)
    for token in (jti_token, by_revoked, by_disabled):
        assert list_tools(mesh, token) == grpc.StatusCode.OK

    jti = jwt.decode(jti_token, options={"verify_signature": False})["jti"]
    assert ok(cli(mesh, "revoke", "--jti", jti)).strip() == f"revoked token {jti}"
    assert "state=revoked" in ok(cli(mesh, "revoke", "--client", revoked_id))
    assert "state=disabled" in ok(cli(mesh, "clients", "disable", disabled_id))
    refused_within(mesh, [jti_token, by_revoked, by_disabled], BOUND_S)
    # Only what was revoked: another token of the same client still works.
    assert list_tools(mesh, other) == grpc.StatusCode.OK
    # And no new token: a revoked client lost its secret; a disabled one's right secret gets
    # the answer of a wrong secret (no hint that the secret was right).
    for client_id, secret in ((revoked_id, revoked_secret), (disabled_id, disabled_secret)):
        with pytest.raises(grpc.RpcError) as err:
            issue(mesh, client_id, secret)
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid client credentials",
        )


def test_scopes_are_what_the_client_was_created_with_plus_its_roles(mesh: Mesh) -> None:
    reader_id, reader_secret = create_client(mesh, "dev", scopes="tools:read")
    with pytest.raises(grpc.RpcError) as err:
        issue(mesh, reader_id, reader_secret, ("tools:write",))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reader = issue(mesh, reader_id, reader_secret)
    assert jwt.decode(reader, options={"verify_signature": False})["scope"] == "tools:read"
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Run(gateway_pb2.RunRequest(session_id="sec-r", prompt=READ), metadata=bearer(reader))
        with pytest.raises(grpc.RpcError) as err:
            stub.Run(
                gateway_pb2.RunRequest(session_id="sec-r", prompt=WRITE), metadata=bearer(reader)
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tools:write" in (err.value.details() or "")

        # The role "writer" grants tools:write at issue time; the gateway reads only `scope`.
        writer_id, writer_secret = create_client(mesh, "dev", roles="writer")
        writer = issue(mesh, writer_id, writer_secret)
        claims = jwt.decode(writer, options={"verify_signature": False})
        assert set(claims["scope"].split()) == {"tools:read", "tools:write"}
        assert claims["roles"] == ["writer"]
        reply = stub.Run(
            gateway_pb2.RunRequest(session_id="sec-w", prompt=WRITE), metadata=bearer(writer)
        )
        assert reply.tool_name == "save_note"
        with pytest.raises(grpc.RpcError) as err:
            issue(mesh, writer_id, writer_secret, ("admin",))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_role_claim_alone_grants_nothing_at_the_gateway(mesh: Mesh, forger: Forger) -> None:
    # A validly signed token naming role admin but carrying only tools:read: no write tool.
    token = forger.token(scope="tools:read", roles=["admin", "writer"])
    with mesh.channel("gateway") as channel:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(channel).Run(
                gateway_pb2.RunRequest(session_id="sec-roles", prompt=WRITE),
                metadata=bearer(token),
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tenant_not_in_policy_is_refused_and_sees_no_other_tenant(mesh: Mesh) -> None:
    stranger_id, stranger_secret = create_client(mesh, "stranger", scopes="tools:read tools:write")
    stranger = issue(mesh, stranger_id, stranger_secret)
    dev = dev_token(mesh)
    session = f"sec-iso-{uuid.uuid4().hex[:8]}"
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Run(gateway_pb2.RunRequest(session_id=session, prompt=READ), metadata=bearer(dev))
        assert (
            len(
                stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id=session), metadata=bearer(dev)
                ).turns
            )
            == 2
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Run(
                gateway_pb2.RunRequest(session_id=session, prompt=READ), metadata=bearer(stranger)
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            list(stub.ListTools(gateway_pb2.ListToolsRequest(), metadata=bearer(stranger)).tools)
            == []
        )
        answers = []
        for session_id in (session, f"never-{uuid.uuid4().hex[:8]}"):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id=session_id),
                    metadata=bearer(stranger),
                )
            answers.append((err.value.code(), err.value.details()))
    # Another tenant's session and a session that never existed look the same.
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.NOT_FOUND


def test_admin_rpcs_need_a_token_with_scope_admin(mesh: Mesh) -> None:
    reader = dev_token(mesh, ("tools:read", "tools:write"))
    denied = cli(mesh, "clients", "list", token=reader)
    assert denied.returncode == 1 and denied.stdout == ""
    assert denied.stderr == "error: PERMISSION_DENIED: scope admin required\n"
    for args in (("keys", "rotate"), ("revoke", "--client", "dev"), ("keys", "list")):
        result = cli(mesh, *args, token=reader)
        assert result.stderr.startswith("error: PERMISSION_DENIED: "), result.stderr
    bad = cli(mesh, "clients", "list", token="not-a-jwt")
    assert bad.returncode == 1 and bad.stderr.startswith("error: UNAUTHENTICATED: ")
    with mesh.channel("auth") as channel:
        stub = auth_pb2_grpc.AuthStub(channel)
        for call, request in (
            (stub.ListClients, auth_pb2.ListClientsRequest()),
            (stub.CreateClient, auth_pb2.CreateClientRequest(tenant="dev", scopes=["admin"])),
            (stub.RotateKey, auth_pb2.RotateKeyRequest()),
            (stub.RevokeToken, auth_pb2.RevokeTokenRequest(token_id="abc")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The admin itself: list shows the clients made above, never a secret or a hash.
    listing = ok(cli(mesh, "clients", "list", "--json"))
    assert "secret" not in listing and "argon2" not in listing


def test_a_tenant_admin_is_confined_to_its_tenant(mesh: Mesh) -> None:
    """Scope admin administers its own tenant only; the dev client (platform:admin) any."""
    suffix = uuid.uuid4().hex[:6]
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    admin_id, admin_secret = create_client(mesh, acme, roles="admin")
    own_id, own_secret = create_client(mesh, acme, scopes="tools:read")
    bot_id, bot_secret = create_client(mesh, globex, scopes="tools:read")
    tenant_admin = issue(mesh, admin_id, admin_secret)

    listing = json.loads(ok(cli(mesh, "clients", "list", "--json", token=tenant_admin)))
    assert sorted(c["client_id"] for c in listing["clients"]) == sorted([admin_id, own_id])
    for args in (
        ("clients", "list", "--tenant", globex),
        ("clients", "create", "--tenant", globex, "--roles", "admin"),
        ("clients", "create", "--roles", "platform-operator"),
        ("keys", "list"),
        ("keys", "rotate"),
    ):
        result = cli(mesh, *args, token=tenant_admin)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: PERMISSION_DENIED: "), result.stderr
    # Another tenant's client answers exactly like one that does not exist.
    unknown = f"nobody-{suffix}"
    for action in ("disable", "delete", "rotate-secret"):
        other = cli(mesh, "clients", action, bot_id, token=tenant_admin)
        missing = cli(mesh, "clients", action, unknown, token=tenant_admin)
        assert other.returncode == missing.returncode == 1
        assert other.stderr.startswith("error: NOT_FOUND: ")
        assert other.stderr.replace(bot_id, "X") == missing.stderr.replace(unknown, "X")

    # acme's admin names globex's token id as well as its own tenant's: only its own stops.
    bot_token, own_token = issue(mesh, bot_id, bot_secret), issue(mesh, own_id, own_secret)
    for token in (bot_token, own_token):
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        ok(cli(mesh, "revoke", "--jti", jti, token=tenant_admin))
    refused_within(mesh, [own_token], BOUND_S)
    assert list_tools(mesh, bot_token) == grpc.StatusCode.OK
    assert issue(mesh, bot_id, bot_secret)  # globex's client was not touched

    # The platform operator acts on globex.
    assert "state=disabled" in ok(cli(mesh, "clients", "disable", bot_id))
    refused_within(mesh, [bot_token], BOUND_S)


def test_only_the_gateway_and_operator_certificates_reach_auth(mesh: Mesh) -> None:
    with mesh.channel("auth", identity="router") as channel:
        with pytest.raises(grpc.RpcError) as err:
            auth_pb2_grpc.AuthStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(mesh.target("auth")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            auth_pb2_grpc.AuthStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _private_key_material(mesh: Mesh) -> set[str]:
    found = set()
    for path in (mesh.data_dir / "auth" / "keys").glob("*.pem"):
        text = path.read_text()
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
        found.add(body)
        key = serialization.load_pem_private_key(text.encode(), password=None)
        raw = key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        found |= {b64(raw), raw.hex()}
    return found


def _span_rows(mesh: Mesh, trace_id: str, timeout: float = 15.0) -> list[str]:
    """Every stored span and audit row as text, once the run's trace has arrived."""
    url = mesh.database_urls.get("telemetry")

    def rows(sql: str) -> list[str]:
        if url:
            conninfo = make_url(url).set(drivername="postgresql")
            with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
                return [repr(r) for r in conn.execute(sql)]
        with sqlite3.connect(mesh.data_dir / "telemetry.db") as conn:
            return [repr(r) for r in conn.execute(sql)]

    deadline = time.monotonic() + timeout
    while not any(trace_id in r for r in rows("SELECT trace_id FROM telemetry_spans")):
        assert time.monotonic() < deadline, f"trace {trace_id} never reached telemetry"
        time.sleep(0.5)
    return rows("SELECT * FROM telemetry_spans") + rows("SELECT * FROM telemetry_audit")


def test_no_secret_in_logs_spans_or_responses(mesh: Mesh, forger: Forger) -> None:
    responses: list[str] = []
    client_id, secret = create_client(mesh, "dev", scopes="tools:read tools:write")
    token = issue(mesh, client_id, secret)
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reply = stub.Run(
            gateway_pb2.RunRequest(session_id="sec-hygiene", prompt=WRITE), metadata=bearer(token)
        )
        responses.append(str(reply))
        responses.append(
            str(
                stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id="sec-hygiene"), metadata=bearer(token)
                )
            )
        )
        for attempt in (
            lambda: stub.IssueToken(
                gateway_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret + "x"),
                timeout=10,
            ),
            lambda: stub.ListTools(
                gateway_pb2.ListToolsRequest(),
                metadata=bearer(forger.token(iss="evil")),
                timeout=10,
            ),
            lambda: stub.ListTools(
                gateway_pb2.ListToolsRequest(), metadata=bearer(token + "x"), timeout=10
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            responses.append(
                f"{err.value.code()} {err.value.details()} {err.value.trailing_metadata()}"
            )
    responses.append(
        cli(mesh, "token", "--client-id", client_id, "--client-secret-file", "/nonexistent").stderr
    )
    responses.append(ok(cli(mesh, "clients", "list")))
    responses.append(ok(cli(mesh, "keys", "list", "--json")))
    dev = mesh.dev_credentials()["client_secret"]
    secrets = SEEN_SECRETS | {secret, dev} | _private_key_material(mesh)
    # A token may be cut short in a log line: its signature alone must not appear either.
    secrets |= {t.rsplit(".", 1)[-1] for t in SEEN_SECRETS if t.count(".") == 2}
    secrets = {s for s in secrets if len(s) >= 16}

    stored = _span_rows(mesh, reply.trace_id)
    places = {
        f"log of {name}": mesh.log_path(name).read_text(errors="replace") for name in SERVICES
    }
    places["spans and audit rows"] = "\n".join(stored)
    places["responses"] = "\n".join(responses)
    leaks = [(where, s[:8] + "...") for where, text in places.items() for s in secrets if s in text]
    assert leaks == []
    assert re.search(r"token\.issue", places["log of auth"])  # the audit lines are there


# --- a dedicated mesh: own policy (tenant acme), key rotation ------------------------------

POLICY = """
version = "sec-test.1"

[roles]
reader = ["tools:read"]
writer = ["tools:read", "tools:write"]
admin = ["tools:read", "tools:write", "ops:read", "admin"]

[tenants.dev]
allowed_tools = ["*"]

[tenants.acme]
allowed_tools = ["calculator"]
"""


@pytest.fixture(scope="module")
def own_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("mesh-security")
    policy = data_dir / "policy.toml"
    policy.write_text(POLICY)
    mesh = Mesh(data_dir=data_dir, tls=True, extra_env={"TOOLMESH_AUTH_POLICY_FILE": str(policy)})
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


def test_tenant_isolation_between_two_allowed_tenants(own_mesh: Mesh) -> None:
    acme_id, acme_secret = create_client(own_mesh, "acme", scopes="tools:read tools:write")
    acme = issue(own_mesh, acme_id, acme_secret)
    dev = dev_token(own_mesh)
    with own_mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # acme may use the calculator, and only that, whatever its scopes.
        assert [
            t.name
            for t in stub.ListTools(gateway_pb2.ListToolsRequest(), metadata=bearer(acme)).tools
        ] == ["calculator"]
        stub.Run(gateway_pb2.RunRequest(session_id="acme-1", prompt=READ), metadata=bearer(acme))
        # The router never picks a tool outside acme's allowlist, whatever the prompt asks.
        reply = stub.Run(
            gateway_pb2.RunRequest(session_id="acme-w", prompt=WRITE), metadata=bearer(acme)
        )
        assert reply.tool_name in ("", "calculator"), reply
        stub.Run(gateway_pb2.RunRequest(session_id="dev-1", prompt=READ), metadata=bearer(dev))

        def history(session: str, token: str) -> grpc.StatusCode | int:
            try:
                return len(
                    stub.GetHistory(
                        gateway_pb2.GetHistoryRequest(session_id=session), metadata=bearer(token)
                    ).turns
                )
            except grpc.RpcError as err:
                return err.code()  # type: ignore[no-any-return]

        assert history("acme-1", acme) == 2
        assert history("dev-1", dev) == 2
        assert history("dev-1", acme) == grpc.StatusCode.NOT_FOUND
        assert history("acme-1", dev) == grpc.StatusCode.NOT_FOUND
        assert history("nobody", acme) == grpc.StatusCode.NOT_FOUND
    # The same session id in two tenants stays two sessions.
    with own_mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Run(gateway_pb2.RunRequest(session_id="acme-1", prompt=READ), metadata=bearer(dev))
        assert (
            len(
                stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id="acme-1"), metadata=bearer(acme)
                ).turns
            )
            == 2
        )


def test_key_rotation_and_retirement_without_restarts(own_mesh: Mesh) -> None:
    pids = {name: proc.pid for name, proc in own_mesh.procs.items()}
    keys = json.loads(ok(cli(own_mesh, "keys", "list", "--json")))["keys"]
    (first,) = [k["kid"] for k in keys if k["state"] == "KEY_STATE_ACTIVE"]
    token_a = dev_token(own_mesh, ("tools:read",))
    assert jwt.get_unverified_header(token_a)["kid"] == first

    rotated = json.loads(ok(cli(own_mesh, "keys", "rotate", "--json")))
    second = rotated["active"]["kid"]
    assert second != first and rotated["previous"]["kid"] == first
    token_b = dev_token(own_mesh, ("tools:read",))
    assert jwt.get_unverified_header(token_b)["kid"] == second
    # The gateway learns the new key on first sight of its kid; the old one still verifies.
    assert list_tools(own_mesh, token_b) == grpc.StatusCode.OK
    assert list_tools(own_mesh, token_a) == grpc.StatusCode.OK

    retired = ok(cli(own_mesh, "keys", "retire", "--", first))
    assert first in retired and "retired" in retired
    refused_within(own_mesh, [token_a], BOUND_S)
    assert list_tools(own_mesh, token_b) == grpc.StatusCode.OK
    listed = ok(cli(own_mesh, "keys", "list"))
    assert re.search(rf"{first}\s+EdDSA\s+retired", listed), listed
    assert re.search(rf"{second}\s+EdDSA\s+active", listed), listed
    # No process was restarted.
    assert {name: proc.pid for name, proc in own_mesh.procs.items()} == pids
    assert all(proc.poll() is None for proc in own_mesh.procs.values())


def test_production_refuses_dev_material_and_plaintext(own_mesh: Mesh) -> None:
    """Each service as a real process with TOOLMESH_ENV=production: non-zero exit and why."""
    base = own_mesh.env()
    base["TOOLMESH_ENV"] = "production"
    for name in SERVICES:
        base[f"TOOLMESH_{name.upper()}_PORT"] = "0"

    def start(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    plaintext = {k: v for k, v in base.items() if "TLS_" not in k}
    # The refusals do not depend on one another: the processes run at once.
    with ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
        results = pool.map(
            lambda name: start("gateway" if name == "gateway" else f"services.{name}", plaintext),
            SERVICES,
        )
    for name, result in zip(SERVICES, results, strict=True):
        assert result.returncode != 0, (name, result.stdout, result.stderr)
        text = result.stdout + result.stderr
        assert "requires mutual TLS" in text and "TOOLMESH_TLS_CERT_FILE" in text, (name, text)

    # With TLS, auth still refuses this mesh's material: the dev client exists (and its dev key
    # was retired above), so it says how to delete it.
    result = start("services.auth", base)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "dev client exists" in text or "dev signing key" in text, text
    assert "python -m services.auth" in text


def test_production_refuses_a_dev_signing_key(mesh: Mesh) -> None:
    env = mesh.env()
    env["TOOLMESH_ENV"] = "production"
    env["TOOLMESH_AUTH_PORT"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "services.auth"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "dev signing key" in text and "rotate-key" in text, text
