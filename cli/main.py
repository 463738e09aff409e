"""``toolmesh``: argparse front end; every command maps to one gateway RPC, except ``up``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from cli import output
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
GROUP_BY = {
    "service": telemetry_pb2.STATS_GROUP_BY_SERVICE,
    "route": telemetry_pb2.STATS_GROUP_BY_ROUTE,
    "tool": telemetry_pb2.STATS_GROUP_BY_TOOL,
}


class CliError(Exception):
    """A problem found before or outside any RPC; printed as ``error: <message>``."""


def data_dir() -> Path:
    return Path(os.environ.get("TOOLMESH_DATA_DIR", "var"))


def dev_client_file() -> Path:
    return data_dir() / "auth" / "dev-client.json"


def read_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """--client-id with --client-secret-file, or the dev client that auth writes on first start."""
    if getattr(args, "client_id", None):
        if not args.client_secret_file:
            raise CliError("--client-id needs --client-secret-file")
        try:
            secret = Path(args.client_secret_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.client_secret_file}: {exc.strerror}") from None
        return args.client_id, secret
    path = dev_client_file()
    try:
        creds = json.loads(path.read_text())
        return str(creds["client_id"]), str(creds["client_secret"])
    except FileNotFoundError:
        raise CliError(
            f"no token: pass --token or set TOOLMESH_TOKEN, or start the mesh (toolmesh up) so "
            f"that {path} exists (TOOLMESH_DATA_DIR sets its directory)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"{path} is not a readable dev client file") from None


def issue_token(
    stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace
) -> gateway_pb2.IssueTokenResponse:
    client_id, secret = read_credentials(args)
    reply: gateway_pb2.IssueTokenResponse = stub.IssueToken(
        gateway_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret),
        timeout=args.timeout,
    )
    return reply


def bearer(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> tuple[tuple[str, str]]:
    token = args.token or os.environ.get("TOOLMESH_TOKEN") or issue_token(stub, args).access_token
    return (("authorization", f"Bearer {token}"),)


def cmd_run(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> str:
    reply = stub.Run(
        gateway_pb2.RunRequest(
            session_id=args.session, prompt=args.prompt, idempotency_key=args.idempotency_key
        ),
        metadata=bearer(stub, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else output.format_run(reply)


def cmd_history(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> str:
    reply = stub.GetHistory(
        gateway_pb2.GetHistoryRequest(session_id=args.session, limit=args.limit),
        metadata=bearer(stub, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else output.format_history(reply)


def cmd_token(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> str:
    reply = issue_token(stub, args)
    return output.as_json(reply) if args.json else reply.access_token


def cmd_tools(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> str:
    reply = stub.ListTools(
        gateway_pb2.ListToolsRequest(), metadata=bearer(stub, args), timeout=args.timeout
    )
    return output.as_json(reply) if args.json else output.format_tools(reply)


def cmd_stats(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> str:
    reply = stub.GetStats(
        gateway_pb2.GetStatsRequest(group_by=GROUP_BY[args.by], window_seconds=args.window),
        metadata=bearer(stub, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else output.format_stats(reply, args.by)


Command = Callable[[gateway_pb2_grpc.GatewayStub, argparse.Namespace], str]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("TOOLMESH_TARGET", DEFAULT_TARGET),
        help="gateway address (env TOOLMESH_TARGET; default %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    with_token = argparse.ArgumentParser(add_help=False)
    with_token.add_argument(
        "--token", default="", help="bearer token (env TOOLMESH_TOKEN; default: a dev token)"
    )

    parser = argparse.ArgumentParser(prog="toolmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common, with_token], help="answer a prompt with a tool")
    run.add_argument("prompt")
    run.add_argument("--session", required=True)
    run.add_argument("--idempotency-key", default="")
    run.set_defaults(handler=cmd_run)

    history = sub.add_parser("history", parents=[common, with_token], help="a session's turns")
    history.add_argument("--session", required=True)
    history.add_argument("--limit", type=int, default=0, help="most recent N turns (0: 100)")
    history.set_defaults(handler=cmd_history)

    token = sub.add_parser("token", parents=[common], help="issue an access token")
    token.add_argument("--client-id", default="")
    token.add_argument("--client-secret-file", default="")
    token.set_defaults(handler=cmd_token)

    tools = sub.add_parser("tools", parents=[common, with_token], help="tools you may use")
    tools.set_defaults(handler=cmd_tools)

    stats = sub.add_parser("stats", parents=[common, with_token], help="latency and errors")
    stats.add_argument("--by", choices=sorted(GROUP_BY), default="service")
    stats.add_argument("--window", type=int, default=3600, help="seconds (default 3600)")
    stats.set_defaults(handler=cmd_stats)

    from cli import up

    up.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from cli import up

        return up.run(args)
    handler: Command = args.handler
    try:
        with grpc.insecure_channel(args.target) as channel:
            text = handler(gateway_pb2_grpc.GatewayStub(channel), args)
    except grpc.RpcError as err:
        print(output.format_rpc_error(err), file=sys.stderr)
        return 1
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
