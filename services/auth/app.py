"""Wiring of the auth service: database, keys, first-start dev material, production checks."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from grpc import aio
from pydantic import SecretStr

from services.auth.audit import OPERATOR_TENANT, AuditTrail
from services.auth.credentials import SecretHasher, new_secret
from services.auth.keys import KeyFiles
from services.auth.models import CLIENT_DELETED, CLIENT_ENABLED, KEY_RETIRED, ClientRow
from services.auth.policy import PolicySource
from services.auth.policy_store import PolicyStore, seed_policy
from services.auth.servicer import AuthServicer
from services.auth.settings import AuthSettings
from services.auth.store import Conflict, Store
from services.kit.audit import SUCCESS, AuditAction
from services.kit.db import create_engine
from services.kit.peers import ANY_PEER, GATEWAY, OPERATOR, PeerRules
from services.kit.scopes import ADMIN, OPS_READ, PLATFORM_ADMIN, TOOLS_READ, TOOLS_WRITE
from services.kit.server import Cleanup, Register, Registered, StartupRefused
from services.kit.settings import Environment, ServiceSettings
from services.kit.startup import check_private, env_name
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("toolmesh.auth")

DEV_CLIENT_ID = "dev"
DEV_TENANT = "dev"
# Every scope, platform:admin included: the dev client of `make run` is the laptop's operator.
# Production never has a dev client (check_production refuses to start while it exists).
DEV_SCOPES = " ".join((TOOLS_READ, TOOLS_WRITE, OPS_READ, ADMIN, PLATFORM_ADMIN))
SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name
# The gateway keeps keys, revocations and policy fresh and forwards token requests; the
# operator's tools call the admin RPCs directly (each also checks the admin token it carries).
_GATEWAY_OR_OPERATOR = [GATEWAY, OPERATOR]
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "IssueToken": _GATEWAY_OR_OPERATOR,
        "GetJwks": _GATEWAY_OR_OPERATOR,
        "VerifyToken": _GATEWAY_OR_OPERATOR,
        "GetRevocations": _GATEWAY_OR_OPERATOR,
        "GetPolicy": _GATEWAY_OR_OPERATOR,
        "GetServiceInfo": [ANY_PEER],
        "CreateClient": _GATEWAY_OR_OPERATOR,
        "ListClients": _GATEWAY_OR_OPERATOR,
        "DisableClient": _GATEWAY_OR_OPERATOR,
        "DeleteClient": _GATEWAY_OR_OPERATOR,
        "RotateClientSecret": _GATEWAY_OR_OPERATOR,
        "ListKeys": _GATEWAY_OR_OPERATOR,
        "RotateKey": _GATEWAY_OR_OPERATOR,
        "RetireKey": _GATEWAY_OR_OPERATOR,
        "RevokeToken": _GATEWAY_OR_OPERATOR,
        "RevokeClient": _GATEWAY_OR_OPERATOR,
        "CreateTenant": _GATEWAY_OR_OPERATOR,
        "ListTenants": _GATEWAY_OR_OPERATOR,
        "GetTenant": _GATEWAY_OR_OPERATOR,
        "AllowTools": _GATEWAY_OR_OPERATOR,
        "DenyTools": _GATEWAY_OR_OPERATOR,
        "SetRole": _GATEWAY_OR_OPERATOR,
    },
)


def write_private_json(path: Path, payload: dict[str, str]) -> None:
    """Write a file readable by its owner only, replacing any previous one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


async def ensure_dev_key(store: Store, key_files: KeyFiles) -> None:
    """First start in dev: create a key pair, flagged dev so production refuses it."""
    if await store.active_key() is not None:
        return
    kid, x = key_files.create()
    if await store.add_first_key(kid, x, dev=True):
        log.info("created dev signing key", extra={"kid": kid})
    else:
        key_files.remove(kid)  # another replica created one first


async def ensure_dev_client(settings: AuthSettings, store: Store, hasher: SecretHasher) -> None:
    """First start in dev: a client with every scope, its secret in a 0600 file, never logged.

    A dev client made by an earlier release gets the scopes added since (platform:admin)."""
    existing = await store.client(DEV_CLIENT_ID)
    if existing is not None:
        if existing.state == CLIENT_ENABLED and set(DEV_SCOPES.split()) - set(
            existing.scopes.split()
        ):
            await store.set_scopes(DEV_CLIENT_ID, DEV_SCOPES)
        return
    secret: SecretStr = new_secret()
    now = time.time()
    row = ClientRow(
        client_id=DEV_CLIENT_ID,
        tenant=DEV_TENANT,
        scopes=DEV_SCOPES,
        roles="admin",
        state=CLIENT_ENABLED,
        secret_hash=await hasher.hash(secret),
        created_at=now,
        updated_at=now,
    )
    try:
        await store.add_client(row)
    except Conflict:
        return  # another replica created it and wrote the file
    write_private_json(
        settings.dev_client_file(),
        {
            "client_id": DEV_CLIENT_ID,
            "client_secret": secret.get_secret_value(),
            "tenant": DEV_TENANT,
        },
    )
    log.info(
        "created dev client",
        extra={"client_id": DEV_CLIENT_ID, "file": str(settings.dev_client_file())},
    )


async def check_production(store: Store) -> None:
    """Production must not run on material created for a laptop."""
    active = await store.active_key()
    if active is None:
        raise StartupRefused(
            "no active signing key: run `python -m services.auth rotate-key` with the production "
            "settings to create one, then start again"
        )
    dev_keys = [k.kid for k in await store.keys() if k.dev and k.state != KEY_RETIRED]
    if dev_keys:
        raise StartupRefused(
            f"the auto-created dev signing key {dev_keys[0]} is still in use: run `python -m "
            "services.auth rotate-key`, then `python -m services.auth retire-key <dev kid>`"
        )
    dev_client = await store.client(DEV_CLIENT_ID)
    if dev_client is not None and dev_client.state != CLIENT_DELETED:
        raise StartupRefused(
            "the dev client exists: run `python -m services.auth delete-client dev` (and create "
            "real clients with CreateClient), then start again"
        )


async def check_signing_key(
    store: Store, key_files: KeyFiles, settings: AuthSettings | None = None
) -> None:
    """Fail at start, not on the first IssueToken, when this replica cannot sign; in
    production also when its private key is readable by others."""
    signer = await store.signing_key()
    if signer is None:
        return
    if settings is not None and settings.env == Environment.PRODUCTION:
        check_private({env_name(AuthSettings, "keys_dir"): key_files.path(signer.kid)})
    try:
        key_files.load(signer.kid, signer.public_x)
    except (OSError, ValueError) as error:
        raise StartupRefused(
            f"signing key {signer.kid} is not readable at {key_files.path(signer.kid)} "
            f"({type(error).__name__}): mount the keys dir every replica shares, or rotate with "
            "`python -m services.auth rotate-key` where it is writable"
        ) from None


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """The kit's entry point: set everything up when the server registers its services."""
    assert isinstance(settings, AuthSettings)

    async def register(server: aio.Server) -> Registered:
        settings.ensure_data_dir()
        # Holds the dev client's secret and, by default, the private keys.
        settings.dev_client_file().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_engine(settings.resolved_database_url())
        store = Store(engine)
        key_files = KeyFiles(settings.resolved_keys_dir())
        hasher = SecretHasher()
        try:
            await store.create_schema(migrate=settings.migrate_on_start)
            if settings.env == Environment.PRODUCTION:
                await check_production(store)
            else:
                await ensure_dev_key(store, key_files)
                await ensure_dev_client(settings, store, hasher)
            await check_signing_key(store, key_files, settings)
            policies = PolicyStore(engine)
            seeded = await seed_policy(settings, policies)
            policy = PolicySource(policies, settings.policy_check_interval_s)
            await policy.fresh(force=True)
        except BaseException:
            await engine.dispose()  # the server never started, so no clean-up would run
            raise
        cleanups.append(engine.dispose)
        # Audit events wait in auth's outbox table until telemetry has them; a relay started
        # here delivers them (and whatever an earlier run or another replica left) with backoff.
        trail = AuditTrail(
            settings.resolved_database_url(),
            settings.telemetry_target,
            lambda: policy.current().version,
            legacy_file=settings.resolved_audit_outbox_file(),
            call_timeout_s=settings.audit_call_timeout_s,
            base_backoff_s=settings.audit_backoff_base_s,
            max_backoff_s=settings.audit_backoff_max_s,
        )
        try:
            await trail.open()
        except BaseException:
            await trail.close()
            raise
        # Cleanups run in reverse: the trail closes before the engine is disposed.
        cleanups.append(trail.close)
        trail.start()
        if seeded:
            await trail.record(
                AuditAction.AUDIT_ACTION_ADMIN_POLICY_SEED,
                SUCCESS,
                tenant=OPERATOR_TENANT,
                actor="",
                target=str(settings.policy_file)[-200:],
                details={"policy_version": policy.current().number},
            )
        servicer = AuthServicer(
            settings, store, key_files, policy, hasher, audit=trail, policies=policies
        )
        auth_pb2_grpc.add_AuthServicer_to_server(servicer, server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register
