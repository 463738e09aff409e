"""Checking a RegisterBackend request field by field, before anything is stored or started."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from services.router.backends.clients import target_hosts
from services.router.backends.config import PROTO_TO_KIND, BackendConfig, Kind
from services.router.backends.contracts import TOOL_NAME
from services.router.backends.network import CommandPolicy, HostPolicy, HostRefused
from services.router.registry import SideEffect
from toolmesh.router.v1 import router_pb2

BACKEND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# A bearer_env must name a variable set aside for backend secrets: a registration can then
# never make the router send one of its own settings (a database URL, a key path) as a token.
SECRET_ENV_PREFIX = "TOOLMESH_SECRET_"  # noqa: S105 - a name prefix, not a secret
ENV_NAME = re.compile(r"^TOOLMESH_SECRET_[A-Za-z0-9_]{1,100}$")
MAX_ARGS = 64
MAX_ARG_CHARS = 4096
MAX_URL_CHARS = 2048
MAX_TARGET_CHARS = 512
MAX_PATH_CHARS = 1024
MAX_SIDE_EFFECTS = 256
MAX_COST_UNITS = 1_000_000
MAX_TIMEOUT_MS = 300_000
MIN_TIMEOUT_MS = 100
MAX_CONCURRENCY = 1024
_TARGET = re.compile(r"^(dns:///)?[A-Za-z0-9.\-\[\]:]+(,[A-Za-z0-9.\-\[\]:]+)*$|^ipv4:[0-9.:,]+$")

Violations = list[tuple[str, str]]


def _secret_problems(
    backend: router_pb2.Backend, kind: Kind, secret_dirs: list[Path] | None
) -> Violations:
    """``secret_dirs``: where bearer files may be; empty allows any path, None none at all."""
    problems: Violations = []
    if kind is not Kind.MCP_HTTP:
        for field in ("bearer_file", "bearer_env"):
            if getattr(backend, field):
                problems.append((f"backend.{field}", "only for MCP_HTTP backends"))
        return problems
    if backend.bearer_file and backend.bearer_env:
        problems.append(("backend.bearer_env", "set bearer_file or bearer_env, not both"))
    if backend.bearer_file:
        path = backend.bearer_file
        if len(path) > MAX_PATH_CHARS or not os.path.isabs(path) or "\x00" in path:
            problems.append(("backend.bearer_file", "must be an absolute path"))
        elif secret_dirs is None:
            problems.append(("backend.bearer_file", "the router lists no backend_secret_dirs"))
        elif secret_dirs and not any(
            Path(os.path.realpath(path)).is_relative_to(d) for d in secret_dirs
        ):
            problems.append(("backend.bearer_file", "is not in the router's backend_secret_dirs"))
        elif not os.access(path, os.R_OK) or not os.path.isfile(path):
            problems.append(("backend.bearer_file", "is not a file the router can read"))
    if backend.bearer_env:
        if not ENV_NAME.match(backend.bearer_env):
            problems.append(
                ("backend.bearer_env", f"must be a variable name starting with {SECRET_ENV_PREFIX}")
            )
        elif backend.bearer_env not in os.environ:
            problems.append(("backend.bearer_env", "is not set in the router's environment"))
    return problems


async def validate(
    backend: router_pb2.Backend,
    *,
    hosts: HostPolicy,
    commands: CommandPolicy,
    secret_dirs: list[Path] | None,
) -> tuple[BackendConfig | None, Violations]:
    """The registration as a BackendConfig, or every problem found (field, why)."""
    problems: Violations = []
    if not BACKEND_NAME.match(backend.name):
        problems.append(("backend.name", "1-32 characters of [a-z0-9_-], starting with a letter"))
    kind = PROTO_TO_KIND.get(backend.kind)
    if kind is None:
        problems.append(("backend.kind", "must be MCP_STDIO, MCP_HTTP or GRPC"))
        return None, problems
    command = tuple(backend.command)
    unused = {
        Kind.MCP_STDIO: ("url", "target"),
        Kind.MCP_HTTP: ("command", "target"),
        Kind.GRPC: ("command", "url"),
    }[kind]
    for field in unused:
        if getattr(backend, field):
            problems.append((f"backend.{field}", f"not used by a {kind.value} backend"))
    if kind is Kind.MCP_STDIO:
        if not command:
            problems.append(("backend.command", "required: the program and its arguments"))
        elif len(command) > MAX_ARGS:
            problems.append(("backend.command", f"at most {MAX_ARGS} arguments"))
        elif any(len(a) > MAX_ARG_CHARS or "\x00" in a for a in command):
            problems.append(("backend.command", f"arguments of at most {MAX_ARG_CHARS} characters"))
        else:
            try:
                commands.resolve(command[0])
            except ValueError as error:
                problems.append(("backend.command[0]", str(error)))
    elif kind is Kind.MCP_HTTP:
        problems += await _url_problems(backend.url, hosts)
    else:
        problems += await _target_problems(backend.target, hosts)
    problems += _secret_problems(backend, kind, secret_dirs)
    if len(backend.side_effects) > MAX_SIDE_EFFECTS:
        problems.append(("backend.side_effects", f"at most {MAX_SIDE_EFFECTS} tools"))
    for tool, value in backend.side_effects.items():
        if not TOOL_NAME.match(tool):
            problems.append(("backend.side_effects", f"{tool[:64]!r} is not a tool name"))
        elif value not in (SideEffect.READ_ONLY.value, SideEffect.WRITE.value):
            problems.append((f"backend.side_effects[{tool}]", "must be read_only or write"))
    if not 0 <= backend.cost_units <= MAX_COST_UNITS:
        problems.append(("backend.cost_units", f"0 to {MAX_COST_UNITS}"))
    if backend.timeout_ms and not MIN_TIMEOUT_MS <= backend.timeout_ms <= MAX_TIMEOUT_MS:
        problems.append(("backend.timeout_ms", f"0 or {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS}"))
    if not 0 <= backend.max_concurrency <= MAX_CONCURRENCY:
        problems.append(("backend.max_concurrency", f"0 to {MAX_CONCURRENCY}"))
    if problems:
        return None, problems
    return (
        BackendConfig(
            name=backend.name,
            kind=kind,
            command=command,
            url=backend.url,
            target=backend.target,
            bearer_file=backend.bearer_file,
            bearer_env=backend.bearer_env,
            side_effects=dict(backend.side_effects),
            cost_units=backend.cost_units,
            timeout_ms=backend.timeout_ms,
            max_concurrency=backend.max_concurrency,
        ),
        [],
    )


async def _url_problems(url: str, hosts: HostPolicy) -> Violations:
    field = "backend.url"
    if not url:
        return [(field, "required for an MCP_HTTP backend")]
    if len(url) > MAX_URL_CHARS:
        return [(field, f"at most {MAX_URL_CHARS} characters")]
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return [(field, "is not a URL")]
    if parts.scheme not in ("http", "https"):
        return [(field, "scheme must be http or https")]
    if not parts.hostname:
        return [(field, "has no host")]
    if parts.username is not None or parts.password is not None:
        return [(field, "must not carry credentials; use bearer_file or bearer_env")]
    if parts.query or parts.fragment:
        return [(field, "must not have a query or fragment (secrets go in bearer_file)")]
    try:
        await hosts.resolve_checked(parts.hostname, port)
    except HostRefused as refused:
        return [(field, f"host refused: {refused}")]
    return []


async def _target_problems(target: str, hosts: HostPolicy) -> Violations:
    field = "backend.target"
    if not target:
        return [(field, "required for a GRPC backend")]
    if len(target) > MAX_TARGET_CHARS or not _TARGET.match(target):
        return [
            (field, "must be host:port, a comma list of them, ipv4:a:p,b:p or dns:///name:port")
        ]
    try:
        pairs = target_hosts(target)
    except ValueError as error:
        return [(field, str(error))]
    for host, port in pairs:
        try:
            await hosts.resolve_checked(host, port)
        except HostRefused as refused:
            return [(field, f"host refused: {refused}")]
    return []
