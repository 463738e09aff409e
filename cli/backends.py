"""Tool backends and direct calls: ``backends add|list|remove``, ``tools`` (``--versions``,
``approve``) and ``call``.

Each maps to one gateway RPC: RegisterBackend, ListBackends, RemoveBackend, ListTools,
ListToolVersions, ApproveToolVersion, CallTool. A stdio command is split here (shlex) into
the explicit argv the router runs, never through a shell; a bearer file is passed by path
(the router reads it), never read or sent by the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from cli import output
from cli.main import CliError, Connection, bearer
from cli.ops import non_negative_int, when
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2

KINDS = {
    router_pb2.BACKEND_KIND_BUILTIN: "builtin",
    router_pb2.BACKEND_KIND_MCP_STDIO: "mcp_stdio",
    router_pb2.BACKEND_KIND_MCP_HTTP: "mcp_http",
    router_pb2.BACKEND_KIND_GRPC: "grpc",
}
STATES = {
    router_pb2.BACKEND_STATE_CONNECTING: "connecting",
    router_pb2.BACKEND_STATE_READY: "ready",
    router_pb2.BACKEND_STATE_DRIFTED: "drifted",
    router_pb2.BACKEND_STATE_FAILING: "failing",
}
VERSION_STATES = {
    router_pb2.TOOL_VERSION_STATE_PUBLISHED: "published",
    router_pb2.TOOL_VERSION_STATE_PENDING: "pending",
    router_pb2.TOOL_VERSION_STATE_RETIRED: "retired",
}
SIDE_EFFECTS = {
    router_pb2.SIDE_EFFECT_READ_ONLY: "read_only",
    router_pb2.SIDE_EFFECT_WRITE: "write",
}


# -- building requests ------------------------------------------------------------------------


def backend_from(args: argparse.Namespace) -> router_pb2.Backend:
    """The Backend to register, from the flags; CliError for a contradiction."""
    backend = router_pb2.Backend(
        name=args.name,
        cost_units=args.cost_units,
        timeout_ms=args.timeout_ms,
        max_concurrency=args.max_concurrency,
    )
    if args.mcp_stdio is not None:
        try:
            argv = shlex.split(args.mcp_stdio)
        except ValueError as exc:
            raise CliError(f"--mcp-stdio: {exc}") from None
        if not argv:
            raise CliError("--mcp-stdio: the command is empty")
        backend.kind = router_pb2.BACKEND_KIND_MCP_STDIO
        backend.command.extend(argv)
    elif args.mcp_http is not None:
        backend.kind = router_pb2.BACKEND_KIND_MCP_HTTP
        backend.url = args.mcp_http
    else:
        backend.kind = router_pb2.BACKEND_KIND_GRPC
        backend.target = args.grpc
    if (args.bearer_file or args.bearer_env) and args.mcp_http is None:
        raise CliError("--bearer-file and --bearer-env go with --mcp-http")
    if args.bearer_file and args.bearer_env:
        raise CliError("give --bearer-file or --bearer-env, not both")
    if args.bearer_file:
        # The router reads the file: give it a path that does not depend on its directory.
        backend.bearer_file = os.path.abspath(args.bearer_file)
    backend.bearer_env = args.bearer_env
    both = set(args.read_only) & set(args.write)
    if both:
        raise CliError(f"{sorted(both)[0]} is given as both --read-only and --write")
    backend.side_effects.update(dict.fromkeys(args.read_only, "read_only"))
    backend.side_effects.update(dict.fromkeys(args.write, "write"))
    return backend


def read_arguments(text: str) -> str:
    """``--args``: JSON, ``@file`` or ``-`` (standard input); a JSON object, re-serialized."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise CliError(f"--args: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--args: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CliError('--args: must be a JSON object, e.g. \'{"timezone": "UTC"}\'')
    return json.dumps(value, ensure_ascii=False)


# -- formatting -------------------------------------------------------------------------------


def where(backend: router_pb2.Backend) -> str:
    if backend.kind == router_pb2.BACKEND_KIND_MCP_STDIO:
        return shlex.join(backend.command)
    return backend.url or backend.target


def format_backend(backend: router_pb2.Backend) -> str:
    rows = [
        ("backend", backend.name),
        ("kind", KINDS.get(backend.kind, "unspecified")),
        ("where", where(backend)),
        ("state", STATES.get(backend.state, "unspecified")),
        ("tenant", backend.tenant or "(shared)"),
        ("discovered", when(backend.last_discovery_at)),
        ("tools", ", ".join(f"{t.name}@{t.version}" for t in backend.tools) or "(none yet)"),
    ]
    if backend.last_error:
        rows.append(("last error", backend.last_error))
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def format_backends(reply: gateway_pb2.ListBackendsResponse) -> str:
    if not reply.backends:
        return "(no backends)"
    return output.table(
        ["BACKEND", "KIND", "STATE", "TOOLS", "LAST DISCOVERY", "WHERE", "LAST ERROR"],
        [
            [
                b.name,
                KINDS.get(b.kind, "unspecified"),
                STATES.get(b.state, "unspecified"),
                ", ".join(f"{t.name}@{t.version}" for t in b.tools) or "-",
                when(b.last_discovery_at),
                where(b),
                b.last_error or "-",
            ]
            for b in reply.backends
        ],
    )


def format_versions(reply: gateway_pb2.ListToolVersionsResponse) -> str:
    if not reply.versions:
        return "(no versions)"
    return output.table(
        ["VERSION", "STATE", "SIDE EFFECT", "FINGERPRINT", "DISCOVERED", "DECIDED", "BY"],
        [
            [
                v.contract.version,
                VERSION_STATES.get(v.state, "unspecified"),
                SIDE_EFFECTS.get(v.contract.side_effect, "unspecified"),
                v.contract.fingerprint,
                when(v.discovered_at),
                when(v.decided_at),
                v.decided_by or "-",
            ]
            for v in reply.versions
        ],
    )


def format_call(reply: gateway_pb2.CallToolResponse) -> str:
    outcome = gateway_pb2.Outcome.Name(reply.outcome).removeprefix("OUTCOME_").lower()
    rows = [
        ("tool", f"{reply.tool_name}@{reply.tool_version}"),
        ("outcome", outcome.replace("_", " ") + (" (replayed)" if reply.replayed else "")),
        ("cost", f"{reply.cost_micros / 1_000_000:.6f} {reply.currency}".rstrip()),
        ("request id", reply.request_id),
        ("trace id", reply.trace_id or "-"),
        ("degraded", ", ".join(reply.degraded) or "none"),
    ]
    answer = reply.answer
    if reply.result_json and reply.result_json.strip() != answer.strip():
        answer += "\n" + reply.result_json
    return answer + "\n\n" + "\n".join(f"{k:<11} {v}" for k, v in rows)


# -- commands ---------------------------------------------------------------------------------


def cmd_backends_add(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.RegisterBackend(
        gateway_pb2.RegisterBackendRequest(backend=backend_from(args), shared=args.shared),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_backend(reply.backend)


def cmd_backends_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ListBackends(
        gateway_pb2.ListBackendsRequest(), metadata=bearer(conn, args), timeout=args.timeout
    )
    return output.as_json(reply) if args.json else format_backends(reply)


def cmd_backends_remove(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.RemoveBackend(
        gateway_pb2.RemoveBackendRequest(name=args.name),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else f"removed backend {args.name}"


def cmd_tools(conn: Connection, args: argparse.Namespace) -> str:
    if args.versions:
        history = conn.gateway.ListToolVersions(
            gateway_pb2.ListToolVersionsRequest(tool_name=args.versions),
            metadata=bearer(conn, args),
            timeout=args.timeout,
        )
        return output.as_json(history) if args.json else format_versions(history)
    reply = conn.gateway.ListTools(
        gateway_pb2.ListToolsRequest(), metadata=bearer(conn, args), timeout=args.timeout
    )
    return output.as_json(reply) if args.json else output.format_tools(reply)


def cmd_tools_approve(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ApproveToolVersion(
        gateway_pb2.ApproveToolVersionRequest(
            tool_name=args.name, fingerprint=args.fingerprint, version=args.version
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    contract = reply.version.contract
    return (
        f"published {contract.name}@{contract.version} (fingerprint {contract.fingerprint}); "
        f"the stable version serves until you release it: toolmesh release start tool "
        f"{contract.name} --candidate {contract.version}"
    )


def cmd_call(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.CallTool(
        gateway_pb2.CallToolRequest(
            tool=args.tool,
            version=args.version,
            arguments_json=read_arguments(args.args),
            session_id=args.session,
            idempotency_key=args.idempotency_key,
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_call(reply)


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    backends = sub.add_parser("backends", help="tool backends: MCP servers, gRPC tool services")
    bsub = backends.add_subparsers(dest="backends_command", required=True, metavar="ACTION")
    add = bsub.add_parser(
        "add",
        parents=[common],
        help="register a backend (admin; --shared: platform:admin)",
        description="Registers a backend of your tenant; the router connects, discovers its "
        "tools and publishes them as <name>.<tool>@<version>.",
    )
    add.add_argument("name", help="1-32 of [a-z0-9_-], starting with a letter")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--mcp-stdio",
        metavar="CMD",
        help='an MCP server the router starts: "program args" (split like a shell would, '
        "run without one)",
    )
    kind.add_argument("--mcp-http", metavar="URL", help="an MCP server over streamable HTTP")
    kind.add_argument("--grpc", metavar="TARGET", help="a toolmesh.tool.v1.ToolService server")
    add.add_argument(
        "--bearer-file", default="", help="--mcp-http: file the router reads the token from"
    )
    add.add_argument(
        "--bearer-env", default="", help="--mcp-http: router environment variable with the token"
    )
    add.add_argument(
        "--read-only",
        nargs="+",
        action="extend",
        default=[],
        metavar="TOOL",
        help="classify these tools as read-only (overrides the server's annotations)",
    )
    add.add_argument(
        "--write",
        nargs="+",
        action="extend",
        default=[],
        metavar="TOOL",
        help="classify these tools as write-capable",
    )
    add.add_argument("--cost-units", type=non_negative_int, default=0, help="per call (0: none)")
    add.add_argument(
        "--timeout-ms", type=non_negative_int, default=0, help="per call (0: router default)"
    )
    add.add_argument(
        "--max-concurrency",
        type=non_negative_int,
        default=0,
        help="calls in flight per tool (0: router default)",
    )
    add.add_argument(
        "--shared", action="store_true", help="for every tenant (needs platform:admin)"
    )
    add.set_defaults(handler=cmd_backends_add)
    blist = bsub.add_parser(
        "list", parents=[common], help="backends, state, tools, last discovery (ops:read)"
    )
    blist.set_defaults(handler=cmd_backends_list)
    remove = bsub.add_parser("remove", parents=[common], help="remove a backend (admin)")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_backends_remove)

    tools = sub.add_parser(
        "tools",
        parents=[common],
        help="tools you may use; --versions NAME: a tool's history; approve: publish a drift",
        allow_abbrev=False,
    )
    tools.add_argument(
        "--versions", metavar="NAME", default="", help="every version of NAME with its state"
    )
    tools.set_defaults(handler=cmd_tools)
    tsub = tools.add_subparsers(dest="tools_command", required=False, metavar="ACTION")
    approve = tsub.add_parser(
        "approve",
        parents=[common],
        help="publish a pending (drifted) contract as a new version (admin)",
    )
    approve.add_argument("name", help="the tool, e.g. time.get_current_time")
    approve.add_argument(
        "--fingerprint", required=True, help="the pending contract's (tools --versions NAME)"
    )
    approve.add_argument("--version", required=True, help="above the latest published version")
    approve.set_defaults(handler=cmd_tools_approve)

    call = sub.add_parser(
        "call",
        parents=[common],
        help="call a tool directly, through the governed pipeline",
        description="Runs TOOL with the given arguments under your tenant's allowlist, scopes "
        "and budgets. A write-capable tool needs --idempotency-key (retry with the same key: "
        "the first answer is replayed, the tool never runs twice).",
    )
    call.add_argument("tool", help="e.g. calculator or time.get_current_time")
    call.add_argument("--version", default="", help="exact version (default: latest published)")
    call.add_argument(
        "--args",
        default="{}",
        help="arguments: a JSON object, @FILE, or - for standard input (default {})",
    )
    call.add_argument("--session", default="", help="remember the call in this session")
    call.add_argument("--idempotency-key", default="")
    call.set_defaults(handler=cmd_call)
