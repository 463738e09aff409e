"""Admin commands: clients, signing keys and revocation, sent to the auth service directly.

Auth verifies the bearer token itself. Scope ``admin`` administers the token's own tenant (its
clients, its tokens); scope ``platform:admin`` (the platform operator) any tenant
(``--tenant``) and the signing keys. Without ``--token`` (or env TOOLMESH_TOKEN) the dev
client's token is used, issued by auth (in dev it holds both). Every change is audited by auth.
A client secret is printed once (or written to ``--secret-file``, mode 0600) and never again.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cli import output
from cli.main import CliError, Connection, caller_token, read_credentials
from toolmesh.auth.v1 import auth_pb2

_CLIENT_STATE_PREFIX = "CLIENT_STATE_"
_KEY_STATE_PREFIX = "KEY_STATE_"


def _words(values: list[str]) -> list[str]:
    """Scopes or roles given space- or comma-separated, possibly repeated; order kept."""
    words = [w for value in values for w in value.replace(",", " ").split()]
    return list(dict.fromkeys(words))


def admin_metadata(conn: Connection, args: argparse.Namespace) -> tuple[tuple[str, str]]:
    def issue() -> auth_pb2.IssueTokenResponse:
        client_id, secret = read_credentials(args)
        reply: auth_pb2.IssueTokenResponse = conn.auth.IssueToken(
            auth_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret),
            timeout=args.timeout,
        )
        return reply

    return (("authorization", f"Bearer {caller_token(args, issue)}"),)


def _state(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _client_line(client: auth_pb2.Client) -> str:
    state = _state(auth_pb2.ClientState, client.state, _CLIENT_STATE_PREFIX)
    return (
        f"{client.client_id}  tenant={client.tenant}  state={state}  "
        f"scopes={' '.join(client.scopes) or '-'}  roles={' '.join(client.roles) or '-'}"
    )


def _key_line(key: auth_pb2.SigningKey) -> str:
    state = _state(auth_pb2.KeyState, key.state, _KEY_STATE_PREFIX)
    created = key.created_at.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{key.kid}  {key.alg}  {state}{'  dev' if key.dev else ''}  created={created}"


def _write_secret(path: str, secret: str) -> None:
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{path} exists; give a new file for the secret") from None
    except OSError as exc:
        raise CliError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")


def _with_secret(args: argparse.Namespace, client: auth_pb2.Client, secret: str, what: str) -> str:
    if args.secret_file:
        _write_secret(args.secret_file, secret)
        shown: dict[str, Any] = {"secret_file": args.secret_file}
    else:
        shown = {"client_secret": secret}
    if args.json:
        body = json.loads(output.as_json(client))
        return json.dumps({"client": body, **shown}, indent=2)
    lines = [_client_line(client), f"client_id: {client.client_id}"]
    if args.secret_file:
        lines.append(f"client secret written to {args.secret_file} (mode 0600)")
    else:
        lines.append(f"client_secret: {secret}")
        lines.append(f"(the {what} secret is shown once; store it now, e.g. in a 0600 file)")
    return "\n".join(lines)


def cmd_clients_create(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.CreateClient(
        auth_pb2.CreateClientRequest(
            client_id=args.new_client_id,
            tenant=args.tenant,
            scopes=_words(args.scopes),
            roles=_words(args.roles),
        ),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    return _with_secret(args, reply.client, reply.client_secret, "client")


def cmd_clients_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.ListClients(
        auth_pb2.ListClientsRequest(tenant=args.tenant, include_deleted=args.include_deleted),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    return "\n".join(_client_line(c) for c in reply.clients) or "no clients"


def cmd_clients_disable(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.DisableClient(
        auth_pb2.DisableClientRequest(client_id=args.id),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else _client_line(reply.client)


def cmd_clients_delete(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.DeleteClient(
        auth_pb2.DeleteClientRequest(client_id=args.id),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else _client_line(reply.client)


def cmd_clients_rotate_secret(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.RotateClientSecret(
        auth_pb2.RotateClientSecretRequest(client_id=args.id),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    return _with_secret(args, reply.client, reply.client_secret, "new")


def cmd_keys_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.ListKeys(
        auth_pb2.ListKeysRequest(), metadata=admin_metadata(conn, args), timeout=args.timeout
    )
    if args.json:
        return output.as_json(reply)
    return "\n".join(_key_line(k) for k in reply.keys) or "no keys"


def cmd_keys_rotate(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.RotateKey(
        auth_pb2.RotateKeyRequest(), metadata=admin_metadata(conn, args), timeout=args.timeout
    )
    if args.json:
        return output.as_json(reply)
    lines = [f"active: {_key_line(reply.active)}"]
    if reply.HasField("previous"):
        lines.append(f"previous: {_key_line(reply.previous)}")
    return "\n".join(lines)


def cmd_keys_retire(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.RetireKey(
        auth_pb2.RetireKeyRequest(kid=args.kid),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else _key_line(reply.key)


def cmd_revoke(conn: Connection, args: argparse.Namespace) -> str:
    if args.tenant and not args.jti:
        raise CliError("--tenant goes with --jti (a client's tenant is known)")
    metadata = admin_metadata(conn, args)
    if args.jti:
        token = conn.auth.RevokeToken(
            auth_pb2.RevokeTokenRequest(token_id=args.jti, tenant=args.tenant),
            metadata=metadata,
            timeout=args.timeout,
        )
        if args.json:
            return output.as_json(token)
        return f"revoked token {token.revoked.token_id}"
    client = conn.auth.RevokeClient(
        auth_pb2.RevokeClientRequest(client_id=args.client),
        metadata=metadata,
        timeout=args.timeout,
    )
    return output.as_json(client) if args.json else _client_line(client.client)


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    clients = sub.add_parser(
        "clients",
        help="service accounts (scope admin: your tenant's; platform:admin: any tenant's)",
    )
    csub = clients.add_subparsers(dest="clients_command", required=True, metavar="ACTION")

    create = csub.add_parser(
        "create",
        parents=[common],
        help="create a client; secret shown once (scope admin; platform:admin for --tenant)",
    )
    create.add_argument(
        "--tenant",
        default="",
        help="the client's tenant (default: your token's; another needs scope platform:admin)",
    )
    create.add_argument(
        "--scopes",
        action="append",
        default=[],
        help='e.g. "tools:read tools:write"; scope admin grants only scopes its token holds',
    )
    create.add_argument("--roles", action="append", default=[], help="roles from the policy")
    create.add_argument(
        "--id", dest="new_client_id", default="", help="wanted id (default: generated)"
    )
    create.add_argument(
        "--secret-file", default="", help="write the secret to this new 0600 file, not stdout"
    )
    create.set_defaults(handler=cmd_clients_create)

    listing = csub.add_parser(
        "list", parents=[common], help="list clients (scope admin: your tenant's)"
    )
    listing.add_argument(
        "--tenant",
        default="",
        help="only this tenant's (default: yours; every tenant's with scope platform:admin)",
    )
    listing.add_argument("--include-deleted", action="store_true")
    listing.set_defaults(handler=cmd_clients_list)

    for name, handler, text in (
        ("disable", cmd_clients_disable, "disable a client: its tokens stop working (admin)"),
        ("delete", cmd_clients_delete, "delete a client: its tokens stop working (admin)"),
        ("rotate-secret", cmd_clients_rotate_secret, "new secret, shown once (admin)"),
    ):
        action = csub.add_parser(name, parents=[common], help=text)
        action.add_argument(
            "id", help="client id (of your tenant; any tenant's with scope platform:admin)"
        )
        if name == "rotate-secret":
            action.add_argument(
                "--secret-file", default="", help="write the secret to this new 0600 file"
            )
        action.set_defaults(handler=handler)

    keys = sub.add_parser("keys", help="token signing keys (scope platform:admin)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ksub.add_parser("list", parents=[common], help="list keys").set_defaults(handler=cmd_keys_list)
    ksub.add_parser(
        "rotate", parents=[common], help="new active key; the old one keeps verifying"
    ).set_defaults(handler=cmd_keys_rotate)
    retire = ksub.add_parser("retire", parents=[common], help="take a key out of the JWKS")
    retire.add_argument("kid", help="key id; put -- before one that starts with -")
    retire.set_defaults(handler=cmd_keys_retire)

    revoke = sub.add_parser(
        "revoke", parents=[common], help="revoke a token or a client (scope admin)"
    )
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", default="", help="the token's jti")
    which.add_argument("--client", default="", help="a client id: all its tokens")
    revoke.add_argument(
        "--tenant",
        default="",
        help="with --jti: the token's tenant (default: yours; with scope platform:admin, "
        "every tenant)",
    )
    revoke.set_defaults(handler=cmd_revoke)
