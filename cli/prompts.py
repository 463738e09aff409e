"""``toolmesh prompts list | show NAME [--version N] | publish NAME --file F | select NAME N``.

Prompt templates (the routing system prompt ``route-system`` and the answer prompt ``answer``)
are immutable versions in the router; publishing changed text makes a new version and selects
it for your tenant (``--shared``: a platform version for every tenant, ``platform:admin``).
Listing and showing need ``ops:read``, publishing and selecting ``admin``; both are audited.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli import output
from cli.main import CliError, Connection, bearer
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2

MAX_TEMPLATE_BYTES = 64 * 1024


def _owner(version: router_pb2.PromptVersion) -> str:
    return version.tenant or "platform"


def format_versions(reply: gateway_pb2.ListPromptsResponse) -> str:
    if not reply.versions:
        return "(no prompt versions)"
    rows = [
        [
            v.ref.name,
            str(v.ref.version),
            "*" if v.selected else "",
            _owner(v),
            v.ref.digest[:12],
            v.created_by or "-",
            v.params_json or "-",
        ]
        for v in reply.versions
    ]
    table = output.table(["NAME", "VERSION", "IN USE", "OWNER", "DIGEST", "BY", "PARAMS"], rows)
    return f"{table}\n* = the version your tenant uses now"


def format_version(version: router_pb2.PromptVersion) -> str:
    ref = version.ref
    facts = [
        ("prompt", f"{ref.name}@{ref.version}"),
        ("digest", ref.digest),
        ("owner", _owner(version)),
        ("in use", "yes" if version.selected else "no"),
        ("params", version.params_json or "none"),
        ("by", version.created_by or "-"),
    ]
    head = "\n".join(f"{k:<7} {v}" for k, v in facts)
    return f"{head}\n\n{version.template}"


def _template(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise CliError(f"{path} is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None


def _params(text: str) -> str:
    if not text:
        return ""
    try:
        if not isinstance(json.loads(text), dict):
            raise ValueError
    except ValueError:
        raise CliError(
            '--params must be a JSON object, e.g. {"intent_without_logprobs": 0.7}'
        ) from None
    return text


def cmd_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ListPrompts(
        gateway_pb2.ListPromptsRequest(name=args.name),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_versions(reply)


def cmd_show(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetPrompt(
        gateway_pb2.GetPromptRequest(name=args.name, version=args.version),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_version(reply.version)


def cmd_publish(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.PublishPrompt(
        gateway_pb2.PublishPromptRequest(
            name=args.name,
            template=_template(args.file),
            params_json=_params(args.params),
            shared=args.shared,
            keep_selection=args.no_select,
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    ref = reply.version.ref
    what = "published" if reply.created else "already published (same content)"
    if args.no_select:
        return (
            f"{ref.name}@{ref.version} {what}; not in use yet (release it: toolmesh release "
            f"start prompt {ref.name} --candidate {ref.version})"
        )
    scope = "every tenant without its own" if args.shared else "your tenant"
    return f"{ref.name}@{ref.version} {what}; now in use for {scope}"


def cmd_select(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.SelectPrompt(
        gateway_pb2.SelectPromptRequest(name=args.name, version=args.version, shared=args.shared),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    ref = reply.version.ref
    return f"{ref.name}@{ref.version} now in use"


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    prompts = sub.add_parser("prompts", help="prompt template versions (route-system, answer)")
    psub = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    listing = psub.add_parser("list", parents=[common], help="versions (ops:read)")
    listing.add_argument("name", nargs="?", default="", help="only this prompt's versions")
    listing.set_defaults(handler=cmd_list)
    show = psub.add_parser("show", parents=[common], help="one version's template (ops:read)")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=0, help="default: the one in use")
    show.set_defaults(handler=cmd_show)
    publish = psub.add_parser(
        "publish",
        parents=[common],
        help="publish a template as a new version and use it (admin)",
        description="Publishes the file's text as the next version of NAME (the same text "
        "again returns the version it already is) and selects it for your tenant.",
    )
    publish.add_argument("name", help="route-system or answer")
    publish.add_argument("--file", required=True, help="the template, UTF-8 text")
    publish.add_argument(
        "--params", default="", help='JSON object, e.g. {"intent_without_logprobs": 0.7}'
    )
    publish.add_argument(
        "--shared", action="store_true", help="a platform version for every tenant"
    )
    publish.add_argument(
        "--no-select",
        action="store_true",
        help="publish only; release it gradually with `toolmesh release start prompt`",
    )
    publish.set_defaults(handler=cmd_publish)
    select = psub.add_parser("select", parents=[common], help="use another version (admin)")
    select.add_argument("name")
    select.add_argument("version", type=int)
    select.add_argument("--shared", action="store_true", help="for every tenant without its own")
    select.set_defaults(handler=cmd_select)
