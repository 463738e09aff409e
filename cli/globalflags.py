"""What every toolmesh command shares beyond its own arguments: global flags before or after
the subcommand, --version, help without code markup, errors as JSON with --json, reading a
prompt from standard input, and the exit status of a fallback answer.

Kept apart from cli.main so that each piece reads (and merges) on its own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from importlib import metadata

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from toolmesh.gateway.v1 import gateway_pb2

# The common flags (cli.main.common_parser) that take a value, and those that do not.
VALUE_FLAGS = frozenset(
    {"--target", "--auth-target", "--token", "--timeout", "--ca-file", "--cert-file", "--key-file"}
)
SWITCH_FLAGS = frozenset({"--json"})
# Exit status of `run --fail-on-fallback` when no tool answered.
FALLBACK_EXIT = 3
FALLBACK_OUTCOMES = frozenset({gateway_pb2.OUTCOME_NO_MATCH, gateway_pb2.OUTCOME_FALLBACK})


def hoist(argv: Sequence[str]) -> list[str]:
    """Move global flags given before the subcommand to after it, where the subcommand's
    parser (which has them all) reads them: ``toolmesh --json run x`` = ``toolmesh run x
    --json``. Anything after ``--`` stays as it is."""
    args = list(argv)
    moved: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if arg == "--" or not arg.startswith("--") or name not in VALUE_FLAGS | SWITCH_FLAGS:
            break
        if name in VALUE_FLAGS and "=" not in arg:
            if i + 1 >= len(args):
                break  # let argparse report the missing value
            moved += args[i : i + 2]
            i += 2
        else:
            moved.append(arg)
            i += 1
    rest = args[i:]
    if not moved:
        return rest
    if "--" in rest:
        cut = rest.index("--")
        return [*rest[:cut], *moved, *rest[cut:]]
    return [*rest, *moved]


def version() -> str:
    try:
        return metadata.version("toolmesh")
    except metadata.PackageNotFoundError:
        return "unknown"


_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")


def plain(text: str) -> str:
    """Help text without reStructuredText markup: ``x`` and `x` become x, a literal block's
    "::" a colon."""
    text = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return re.sub(r"(\S)::(\s)", r"\1:\2", text).replace("\n::\n", "\n")


def strip_markup(parser: argparse.ArgumentParser) -> None:
    """Apply ``plain`` to every description, epilog and help text, subcommands included."""
    seen: set[int] = set()
    pending = [parser]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for attr in ("description", "epilog"):
            value = getattr(current, attr)
            if isinstance(value, str):
                setattr(current, attr, plain(value))
        for action in current._actions:
            if isinstance(action.help, str):
                action.help = plain(action.help)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if isinstance(choice.help, str):
                        choice.help = plain(choice.help)
                pending.extend(action.choices.values())


def polish(parser: argparse.ArgumentParser) -> None:
    """--version on the top level, --fail-on-fallback on run, plain help everywhere."""
    parser.add_argument("--version", action="version", version=f"toolmesh {version()}")
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = subcommands.choices["run"]
    run.add_argument(
        "--fail-on-fallback",
        action="store_true",
        help=f"exit with status {FALLBACK_EXIT} when no tool answered (no match, or a "
        "fallback answer), for scripts",
    )
    for action in run._actions:
        if action.dest == "prompt":
            action.help = "the prompt; - reads it from standard input"
    strip_markup(parser)


def read_prompt(args: argparse.Namespace) -> None:
    """``run -``: the prompt is standard input, without its trailing newline."""
    if getattr(args, "command", "") == "run" and getattr(args, "prompt", None) == "-":
        args.prompt = sys.stdin.read().strip()


def fell_back(args: argparse.Namespace) -> bool:
    """Whether ``run --fail-on-fallback`` must fail: its answer came from no tool."""
    reply = getattr(args, "run_reply", None)
    return bool(getattr(args, "fail_on_fallback", False)) and (
        reply is not None and reply.outcome in FALLBACK_OUTCOMES
    )


def error_json(code: str, message: str, violations: Sequence[tuple[str, str]] = ()) -> str:
    body: dict[str, object] = {"code": code, "message": message}
    if violations:
        body["field_violations"] = [{"field": f, "description": d} for f, d in violations]
    return json.dumps({"error": body})


def rpc_error_json(err: grpc.RpcError) -> str:
    """The status code's name, its message and any BadRequest field violations, as JSON."""
    code = err.code() if isinstance(err, grpc.Call) else None
    message = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
    violations: list[tuple[str, str]] = []
    try:
        status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return error_json(code.name if code is not None else "UNKNOWN", message, violations)
