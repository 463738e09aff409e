"""toolmesh: argparse front end.

run, history, token and stats map to one gateway RPC each, and so do the tool backends and
direct calls backends, tools and call (cli.backends) and the operator views trace, cost,
budget, audit and slo (cli.ops); capacity sizes replicas from measured latency (cli.capacity);
clients, keys, revoke, tenants and roles are admin RPCs sent to the auth service directly (it
verifies the bearer token and needs scope admin); up starts a local mesh. The global flags
(--target, --json, --token and the TLS files) go before or after the subcommand. With
--ca-file (or env TOOLMESH_CLI_TLS_CA_FILE / TOOLMESH_TLS_CA_FILE) every channel is TLS, and
with a client certificate and key (--cert-file/--key-file, env TOOLMESH_CLI_TLS_CERT_FILE /
TOOLMESH_CLI_TLS_KEY_FILE) mutual TLS as that identity (operator for an mTLS mesh). Tokens
are minted once and reused from the user's cache directory until they near expiry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from cli import globalflags, output, tokencache
from toolmesh.auth.v1 import auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_AUTH_TARGET = "127.0.0.1:50052"
# The session of `run` and `history` without --session (or TOOLMESH_SESSION), so that
# `toolmesh run "..."` then `toolmesh history` meet. Sessions are tenant-wide: name one to keep
# a conversation apart.
DEFAULT_SESSION = "cli-default"
SESSION_HELP = "the session to remember the turns in (env TOOLMESH_SESSION; default %(default)s)"
GROUP_BY = {
    "service": telemetry_pb2.STATS_GROUP_BY_SERVICE,
    "route": telemetry_pb2.STATS_GROUP_BY_ROUTE,
    "tool": telemetry_pb2.STATS_GROUP_BY_TOOL,
}


class CliError(Exception):
    """A problem found before or outside any RPC; printed as ``error: <CODE>: <message>``."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


def data_dir() -> Path:
    return Path(os.environ.get("TOOLMESH_DATA_DIR", "var"))


def dev_client_file() -> Path:
    return data_dir() / "auth" / "dev-client.json"


def read_secret_file(path: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise CliError(f"{path} is empty")
    return secret


def read_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """--client-id with --client-secret-file (or env TOOLMESH_CLIENT_SECRET), or the dev client
    that auth writes on first start."""
    if getattr(args, "client_id", None):
        if args.client_secret_file:
            return args.client_id, read_secret_file(args.client_secret_file)
        env_secret = os.environ.get("TOOLMESH_CLIENT_SECRET", "").strip()
        if env_secret:
            return args.client_id, env_secret
        raise CliError("--client-id needs --client-secret-file (or env TOOLMESH_CLIENT_SECRET)")
    path = dev_client_file()
    try:
        creds = json.loads(path.read_text())
        return str(creds["client_id"]), str(creds["client_secret"])
    except FileNotFoundError:
        raise CliError(
            f"no token: pass --token or set TOOLMESH_TOKEN, or start the mesh (toolmesh up) so "
            f"that {path} exists (TOOLMESH_DATA_DIR sets its directory)",
            "UNAUTHENTICATED",
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"{path} is not a readable dev client file", "UNAUTHENTICATED") from None


class Connection:
    """Channels opened on first use: the gateway at --target, auth at --auth-target."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._credentials = channel_credentials(args)
        self._channels: list[grpc.Channel] = []
        self._gateway: gateway_pb2_grpc.GatewayStub | None = None
        self._auth: auth_pb2_grpc.AuthStub | None = None

    def _open(self, target: str) -> grpc.Channel:
        if self._credentials is None:
            channel = grpc.insecure_channel(target)
        else:
            channel = grpc.secure_channel(target, self._credentials)
        self._channels.append(channel)
        return channel

    @property
    def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        if self._gateway is None:
            self._gateway = gateway_pb2_grpc.GatewayStub(self._open(self._args.target))
        return self._gateway

    @property
    def auth(self) -> auth_pb2_grpc.AuthStub:
        if self._auth is None:
            self._auth = auth_pb2_grpc.AuthStub(self._open(self._args.auth_target))
        return self._auth

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def _read_tls_file(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {flag} {path}: {exc.strerror}") from None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """None (plaintext) without a CA file; TLS with one; mutual TLS with a cert and key too."""
    ca, cert, key = args.ca_file, args.cert_file, args.key_file
    if bool(cert) != bool(key):
        raise CliError("--cert-file and --key-file go together")
    if not ca:
        if cert:
            raise CliError("--cert-file needs --ca-file (the mesh CA)")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_tls_file("--ca-file", ca),
        private_key=_read_tls_file("--key-file", key) if key else None,
        certificate_chain=_read_tls_file("--cert-file", cert) if cert else None,
    )


def issue_token(conn: Connection, args: argparse.Namespace) -> gateway_pb2.IssueTokenResponse:
    client_id, secret = read_credentials(args)
    reply: gateway_pb2.IssueTokenResponse = conn.gateway.IssueToken(
        gateway_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret),
        timeout=args.timeout,
    )
    return reply


def caller_token(args: argparse.Namespace, issue: Callable[[], tokencache.TokenReply]) -> str:
    """--token, env TOOLMESH_TOKEN, else the client's cached token (cli.tokencache)."""
    explicit = args.token or os.environ.get("TOOLMESH_TOKEN", "").strip()
    if explicit:
        return str(explicit)
    client_id, secret = read_credentials(args)
    args.token_cache_key = tokencache.cache_key(args.target, client_id, secret)
    token, args.token_reused = tokencache.cached_token(args.token_cache_key, issue)
    return token


def bearer(conn: Connection, args: argparse.Namespace) -> tuple[tuple[str, str]]:
    token = caller_token(args, lambda: issue_token(conn, args))
    return (("authorization", f"Bearer {token}"),)


def cmd_run(conn: Connection, args: argparse.Namespace) -> str:
    if args.stream:
        return run_streamed(conn, args)
    reply = conn.gateway.Run(
        gateway_pb2.RunRequest(
            session_id=args.session, prompt=args.prompt, idempotency_key=args.idempotency_key
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    args.run_reply = reply
    return output.as_json(reply) if args.json else output.format_run(reply)


def run_streamed(conn: Connection, args: argparse.Namespace) -> str:
    """RunStream: steps on stderr, the answer's text on stdout as it comes, then the facts
    (with --json: each event as one JSON line)."""
    events = conn.gateway.RunStream(
        gateway_pb2.RunStreamRequest(
            session_id=args.session, prompt=args.prompt, idempotency_key=args.idempotency_key
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    final: gateway_pb2.RunResponse | None = None
    for event in events:
        kind = event.WhichOneof("event")
        if args.json:
            print(output.as_json(event, indent=None), flush=True)
        elif kind == "answer_chunk":
            sys.stdout.write(event.answer_chunk.text)
            sys.stdout.flush()
        elif kind != "final":
            print(output.format_progress(event), file=sys.stderr, flush=True)
        if kind == "final":
            final = event.final
    if final is None:
        raise CliError("the stream ended without a final answer", "UNAVAILABLE")
    args.run_reply = final
    return "" if args.json else "\n\n" + output.format_run_facts(final)


def cmd_history(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetHistory(
        gateway_pb2.GetHistoryRequest(session_id=args.session, limit=args.limit),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else output.format_history(reply)


def cmd_token(conn: Connection, args: argparse.Namespace) -> str:
    reply = issue_token(conn, args)
    return output.as_json(reply) if args.json else reply.access_token


def cmd_stats(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetStats(
        gateway_pb2.GetStatsRequest(group_by=GROUP_BY[args.by], window_seconds=args.window),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else output.format_stats(reply, args.by)


Command = Callable[[Connection, argparse.Namespace], str]


def _env(*names: str) -> str:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("TOOLMESH_TARGET", DEFAULT_TARGET),
        help="gateway address (env TOOLMESH_TARGET; default %(default)s)",
    )
    common.add_argument(
        "--auth-target",
        default=os.environ.get("TOOLMESH_AUTH_TARGET", DEFAULT_AUTH_TARGET),
        help="auth service address for admin commands (env TOOLMESH_AUTH_TARGET; "
        "default %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    common.add_argument(
        "--ca-file",
        default=_env("TOOLMESH_CLI_TLS_CA_FILE", "TOOLMESH_TLS_CA_FILE"),
        help="mesh CA certificate: use TLS (env TOOLMESH_CLI_TLS_CA_FILE, else "
        "TOOLMESH_TLS_CA_FILE; unset: plaintext)",
    )
    common.add_argument(
        "--cert-file",
        default=_env("TOOLMESH_CLI_TLS_CERT_FILE"),
        help="client certificate for mutual TLS, e.g. the operator's (env "
        "TOOLMESH_CLI_TLS_CERT_FILE)",
    )
    common.add_argument(
        "--key-file",
        default=_env("TOOLMESH_CLI_TLS_KEY_FILE"),
        help="its private key (env TOOLMESH_CLI_TLS_KEY_FILE)",
    )
    common.add_argument(
        "--token", default="", help="bearer token (env TOOLMESH_TOKEN; default: a dev token)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()

    parser = argparse.ArgumentParser(prog="toolmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="answer a prompt with a tool")
    run.add_argument("prompt")
    run.add_argument(
        "--session", default=_env("TOOLMESH_SESSION") or DEFAULT_SESSION, help=SESSION_HELP
    )
    run.add_argument("--idempotency-key", default="")
    run.add_argument(
        "--stream",
        action="store_true",
        help="show each step as it happens and the answer's text as it is written",
    )
    run.set_defaults(handler=cmd_run)

    history = sub.add_parser("history", parents=[common], help="a session's turns")
    history.add_argument(
        "--session", default=_env("TOOLMESH_SESSION") or DEFAULT_SESSION, help=SESSION_HELP
    )
    history.add_argument("--limit", type=int, default=0, help="most recent N turns (0: 100)")
    history.set_defaults(handler=cmd_history)

    token = sub.add_parser(
        "token",
        parents=[common],
        help="issue an access token for a client (default: the dev client)",
    )
    token.add_argument("--client-id", default="")
    token.add_argument(
        "--client-secret-file",
        default="",
        help="file holding the client secret (or env TOOLMESH_CLIENT_SECRET)",
    )
    token.set_defaults(handler=cmd_token)

    stats = sub.add_parser("stats", parents=[common], help="latency and errors")
    stats.add_argument("--by", choices=sorted(GROUP_BY), default="service")
    stats.add_argument("--window", type=int, default=3600, help="seconds (default 3600)")
    stats.set_defaults(handler=cmd_stats)

    from cli import admin, backends, capacity, migrate, ops, prompts, releases, tenants, up

    backends.add_parsers(sub, common)
    prompts.add_parsers(sub, common)
    releases.add_parsers(sub, common)
    ops.add_parsers(sub, common)
    capacity.add_parser(sub, common)
    admin.add_parsers(sub, common)
    tenants.add_parsers(sub, common)
    up.add_parser(sub)
    migrate.add_parser(sub)
    globalflags.polish(parser)
    return parser


def _with_cached_token(handler: Command, conn: Connection, args: argparse.Namespace) -> str:
    """Run ``handler``; a cached token refused as UNAUTHENTICATED (revoked, or signed by a key
    since retired) is dropped and the command runs once more with a new token. The refusal
    came before the RPC did anything, so running it again is safe."""
    try:
        return handler(conn, args)
    except grpc.RpcError as err:
        unauthenticated = isinstance(err, grpc.Call) and err.code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        if not (unauthenticated and getattr(args, "token_reused", False)):
            raise
    tokencache.forget(args.token_cache_key)
    args.token_reused = False
    return handler(conn, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(globalflags.hoist(sys.argv[1:] if argv is None else argv))
    if args.command == "up":
        from cli import up

        return up.run(args)
    if args.command == "migrate":
        from cli import migrate

        return migrate.run(args)
    handler: Command = args.handler
    conn: Connection | None = None
    try:
        globalflags.read_prompt(args)
        conn = Connection(args)
        text = _with_cached_token(handler, conn, args)
    except grpc.RpcError as err:
        if args.json:
            print(globalflags.rpc_error_json(err), file=sys.stderr)
        else:
            print(output.format_rpc_error(err), file=sys.stderr)
        return 1
    except CliError as err:
        if args.json:
            print(globalflags.error_json(err.code, str(err)), file=sys.stderr)
        else:
            print(f"error: {err.code}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if conn is not None:
            conn.close()
    if text:
        print(text)
    return globalflags.FALLBACK_EXIT if globalflags.fell_back(args) else 0


if __name__ == "__main__":
    sys.exit(main())
