"""Tenant commands: tenants, their tool allowlists and the roles, sent to the auth service
directly.

Every change is a new policy version, audited by auth and picked up by every gateway at its
next policy refresh (auth_refresh_s), without a restart. Scope admin manages its own tenant;
platform:admin any tenant, and only it creates tenants.
"""

from __future__ import annotations

import argparse

from cli import output
from cli.admin import admin_metadata
from cli.main import Connection
from toolmesh.auth.v1 import auth_pb2

TOOLS_HELP = "tool names, <backend>.* for every tool of a backend, or * for every tool"


def _tenant_line(tenant: auth_pb2.Tenant) -> str:
    tools = " ".join(tenant.allowed_tools) or "(none)"
    return f"{tenant.tenant}  tools={tools}  changed_in_version={tenant.changed_in_version}"


def _changed(tenant: auth_pb2.Tenant, version: int, changed: bool) -> str:
    note = f"policy version {version}" if changed else f"unchanged, policy version {version}"
    return f"{_tenant_line(tenant)}\n({note})"


def cmd_create(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.CreateTenant(
        auth_pb2.CreateTenantRequest(tenant=args.tenant, allowed_tools=args.allow),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    return _changed(reply.tenant, reply.policy_version, True)


def cmd_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.ListTenants(
        auth_pb2.ListTenantsRequest(), metadata=admin_metadata(conn, args), timeout=args.timeout
    )
    if args.json:
        return output.as_json(reply)
    lines = [_tenant_line(t) for t in reply.tenants] or ["no tenants"]
    return "\n".join([*lines, f"(policy version {reply.policy_version})"])


def cmd_show(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.GetTenant(
        auth_pb2.GetTenantRequest(tenant=args.tenant),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    return f"{_tenant_line(reply.tenant)}\n(policy version {reply.policy_version})"


def cmd_allow(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.AllowTools(
        auth_pb2.AllowToolsRequest(tenant=args.tenant, tools=args.tools),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    return _changed(reply.tenant, reply.policy_version, reply.changed)


def cmd_deny(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.DenyTools(
        auth_pb2.DenyToolsRequest(tenant=args.tenant, tools=args.tools),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    return _changed(reply.tenant, reply.policy_version, reply.changed)


def cmd_roles_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.GetPolicy(auth_pb2.GetPolicyRequest(), timeout=args.timeout)
    if args.json:
        return output.as_json(auth_pb2.GetPolicyResponse(roles=reply.roles, version=reply.version))
    lines = [f"{r.role}  scopes={' '.join(r.scopes) or '(none)'}" for r in reply.roles]
    return "\n".join([*lines, f"(policy version {reply.version})"])


def cmd_roles_set(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.auth.SetRole(
        auth_pb2.SetRoleRequest(role=args.role, scopes=args.scopes),
        metadata=admin_metadata(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    state = "" if reply.changed else "unchanged, "
    return (
        f"{reply.role.role}  scopes={' '.join(reply.role.scopes) or '(none)'}\n"
        f"({state}policy version {reply.policy_version})"
    )


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    tenants = sub.add_parser(
        "tenants",
        help="tenants and their tool allowlists (scope admin: your tenant; platform:admin: any)",
        description=__doc__,
    )
    tsub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")

    create = tsub.add_parser(
        "create", parents=[common], help="create a tenant (scope platform:admin)"
    )
    create.add_argument("tenant", help="lower-case letters, digits, _ . -")
    create.add_argument(
        "--allow", action="append", default=[], metavar="TOOL", help=f"repeatable: {TOOLS_HELP}"
    )
    create.set_defaults(handler=cmd_create)

    tsub.add_parser(
        "list", parents=[common], help="list tenants (scope admin: yours only)"
    ).set_defaults(handler=cmd_list)

    show = tsub.add_parser("show", parents=[common], help="a tenant's allowlist")
    show.add_argument("tenant", nargs="?", default="", help="default: your token's tenant")
    show.set_defaults(handler=cmd_show)

    for name, handler, text in (
        ("allow", cmd_allow, "add tools to a tenant's allowlist"),
        ("deny", cmd_deny, "remove tools from a tenant's allowlist"),
    ):
        action = tsub.add_parser(name, parents=[common], help=text)
        action.add_argument("tenant", help="the tenant (yours, unless scope platform:admin)")
        action.add_argument("tools", nargs="+", metavar="TOOL", help=TOOLS_HELP)
        action.set_defaults(handler=handler)

    roles = sub.add_parser("roles", help="roles and the scopes they grant, shared by every tenant")
    rsub = roles.add_subparsers(dest="roles_command", required=True, metavar="ACTION")
    rsub.add_parser("list", parents=[common], help="every role and its scopes").set_defaults(
        handler=cmd_roles_list
    )
    set_role = rsub.add_parser(
        "set", parents=[common], help="set the scopes a role grants (scope platform:admin)"
    )
    set_role.add_argument("role")
    set_role.add_argument("scopes", nargs="*", metavar="SCOPE", help="e.g. tools:read ops:read")
    set_role.set_defaults(handler=cmd_roles_set)
