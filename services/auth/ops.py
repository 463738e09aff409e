"""Operator commands run against the database and keys dir directly, without a server.

They exist for the steps no admin token can do yet: the first production key and admin client,
and removing the dev key and client before a production start.
"""

from __future__ import annotations

import argparse
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from services.auth.admin import CLIENT_CREATE, CLIENT_DELETE, KEY_RETIRE, KEY_ROTATE
from services.auth.audit import OPERATOR_TENANT, AuditTrail, Staged
from services.auth.credentials import SecretHasher, new_secret
from services.auth.keys import KeyFiles
from services.auth.models import (
    CLIENT_DELETED,
    CLIENT_DISABLED,
    CLIENT_ENABLED,
    CLIENT_REVOKED,
    ClientRow,
    SigningKeyRow,
)
from services.auth.policy import NAME_PATTERN, SCOPE_PATTERN, PolicyInForce
from services.auth.policy_store import PolicyStore, seed_policy
from services.auth.settings import AuthSettings
from services.auth.store import Store
from services.auth.validation import CLIENT_ID_PATTERN
from services.kit.audit import SUCCESS
from services.kit.db import create_engine

ACTOR = "local-operator"
R = TypeVar("R")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m services.auth", description="Run the auth server, or an operator command."
    )
    commands = top.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the server (the default)")
    commands.add_parser("rotate-key", help="create a signing key and make it active")
    retire = commands.add_parser("retire-key", help="take a verifying key out of the JWKS")
    retire.add_argument("kid", help="key id; put -- before one that starts with -")
    delete = commands.add_parser("delete-client", help="delete a client (e.g. dev)")
    delete.add_argument("client_id")
    create = commands.add_parser(
        "create-client", help="create a client; prints its secret once as JSON"
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", action="append", default=[])
    create.add_argument("--role", action="append", default=[])
    create.add_argument("--client-id", default="")
    return top


async def run(settings: AuthSettings, args: argparse.Namespace) -> dict[str, Any]:
    """Run one command; returns what to print. Raises ValueError for bad input."""
    settings.ensure_data_dir()
    engine = create_engine(settings.resolved_database_url())
    # Events go to the server's outbox table, in the transaction of the change they record:
    # a running server's relay (or the next start's) delivers them to telemetry.
    policy = PolicyInForce(0)
    trail = AuditTrail(
        settings.resolved_database_url(),
        settings.telemetry_target,
        lambda: policy.version,
    )
    try:
        store = Store(engine)
        await store.create_schema(migrate=settings.migrate_on_start)
        await trail.open()
        # The first production admin client may come before the first server start: the
        # policy file seeds the database here too, so its roles exist.
        policies = PolicyStore(engine)
        await seed_policy(settings, policies)
        policy = await policies.read()
        keys = KeyFiles(settings.resolved_keys_dir())
        if args.command == "rotate-key":
            kid, x = keys.create()
            rotated: Staged[tuple[SigningKeyRow, SigningKeyRow | None]] = staged(
                trail,
                KEY_ROTATE,
                lambda rows: rows[0].kid,
                lambda rows: {"previous": rows[1].kid if rows[1] else ""},
            )
            new, previous = await store.rotate_to(
                kid, x, settings.key_publish_ahead_s, rotated.items
            )
            rotated.committed()
            return {"active": new.kid, "previous": previous.kid if previous else None}
        if args.command == "retire-key":
            retiring: Staged[SigningKeyRow] = staged(trail, KEY_RETIRE, lambda key: key.kid)
            retired = await store.retire(args.kid, retiring.items)
            retiring.committed()
            keys.remove(retired.kid)
            return {"retired": retired.kid}
        if args.command == "delete-client":
            deleting: Staged[ClientRow] = staged(
                trail, CLIENT_DELETE, lambda c: c.client_id, lambda c: {"client_tenant": c.tenant}
            )
            deleted = await store.set_client_state(
                args.client_id,
                CLIENT_DELETED,
                (CLIENT_ENABLED, CLIENT_DISABLED, CLIENT_REVOKED),
                audit=deleting.items,
            )
            deleting.committed()
            return {"deleted": deleted.client_id}
        return await _create_client(policy, store, trail, args)
    finally:
        await trail.close()
        await engine.dispose()


def staged(
    trail: AuditTrail,
    action: int,
    target: Callable[[R], str],
    details: Callable[[R], dict[str, object]] | None = None,
) -> Staged[R]:
    """The local operator's event of a change, committed in the change's transaction."""
    return trail.staged(
        lambda row: [
            trail.event(
                action,
                SUCCESS,
                tenant=OPERATOR_TENANT,
                actor=ACTOR,
                target=target(row),
                details=details(row) if details else None,
            )
        ]
    )


async def _create_client(
    policy: PolicyInForce, store: Store, trail: AuditTrail, args: argparse.Namespace
) -> dict[str, Any]:
    client_id = args.client_id or f"c-{secrets.token_hex(8)}"
    if not re.fullmatch(CLIENT_ID_PATTERN, client_id):
        raise ValueError("client id: 1-64 letters, digits, '_', '.', '-'")
    if not re.fullmatch(NAME_PATTERN, args.tenant):
        raise ValueError("tenant: lower-case letters, digits, '_', '.', '-'")
    names = [*args.scope, *args.role]
    if not names or not all(re.fullmatch(SCOPE_PATTERN, name) for name in names):
        raise ValueError("give at least one --scope or --role, each a valid name")
    unknown = set(args.role) - set(policy.roles)
    if unknown:
        raise ValueError(f"roles not in the policy: {', '.join(sorted(unknown))}")
    secret = new_secret()
    now = time.time()
    row = ClientRow(
        client_id=client_id,
        tenant=args.tenant,
        scopes=" ".join(args.scope),
        roles=" ".join(args.role),
        state=CLIENT_ENABLED,
        secret_hash=await SecretHasher().hash(secret),
        created_at=now,
        updated_at=now,
    )
    details: dict[str, object] = {
        "client_tenant": row.tenant,
        "scopes": args.scope,
        "roles": args.role,
    }
    creating: Staged[ClientRow] = staged(
        trail, CLIENT_CREATE, lambda c: c.client_id, lambda _: details
    )
    await store.add_client(row, creating.items)
    creating.committed()
    return {
        "client_id": client_id,
        "client_secret": secret.get_secret_value(),
        "tenant": row.tenant,
    }
