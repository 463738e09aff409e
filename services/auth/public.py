"""The public half of toolmesh.auth.v1.Auth: IssueToken, GetJwks, VerifyToken, GetRevocations,
GetPolicy and GetServiceInfo (no bearer token; the peer rules in services.auth.app say which
mesh peers may call each)."""

from __future__ import annotations

import ipaddress
import json
import logging

import grpc
from grpc import aio
from pydantic import SecretStr

from services.auth import validation
from services.auth.base import AuthBase
from services.auth.conversions import revoked_pb, timestamp
from services.auth.keys import public_jwk
from services.auth.models import CLIENT_ENABLED, KEY_ACTIVE, KEY_VERIFYING
from services.auth.tokens import NoSigningKey
from services.kit.audit import SUCCESS, UNKNOWN_TENANT, AuditAction, clean
from services.kit.buildinfo import service_info
from services.kit.context import CLIENT_ADDRESS_METADATA_KEY
from services.kit.errors import abort, abort_invalid, retry_info
from services.kit.peers import GATEWAY, address_of_peer, peer_common_name
from services.kit.tokens import TokenError
from toolmesh.auth.v1 import auth_pb2
from toolmesh.common.v1 import common_pb2

log = logging.getLogger("toolmesh.auth")

CONTRACT_VERSIONS = ["toolmesh.auth.v1"]
# IPv6 sources are throttled per /64: whoever holds one address usually holds the whole prefix.
IPV6_SOURCE_PREFIX = 64
MAX_ADDRESS_CHARS = 64


def throttle_source(address: str) -> str:
    """The key a source address is throttled under."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return clean(address, MAX_ADDRESS_CHARS)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        host_bits = 128 - IPV6_SOURCE_PREFIX
        prefix = int(ip) >> host_bits << host_bits
        return str(ipaddress.IPv6Network((prefix, IPV6_SOURCE_PREFIX)))
    return str(ip)


class PublicRpcs(AuthBase):
    def source_address(self, context: aio.ServicerContext) -> str:
        """The address a credential came from: the one the gateway forwards for its caller
        (trusted only from a peer whose role is gateway, or in plaintext dev mode, where there
        is no peer identity and the mesh is on loopback), else the calling peer's own."""
        common_name = peer_common_name(context)
        if not common_name or self._peer_aliases.get(common_name, common_name) == GATEWAY:
            for key, value in context.invocation_metadata() or ():
                if key == CLIENT_ADDRESS_METADATA_KEY and isinstance(value, str) and value:
                    return address_of_peer(value[: MAX_ADDRESS_CHARS * 2])
        return address_of_peer(context.peer() or "")

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        violations = validation.issue_token(
            request.client_id, request.client_secret, request.scopes
        )
        if violations:
            await abort_invalid(context, violations)
        client_id, secret = request.client_id, SecretStr(request.client_secret)
        address = self.source_address(context)
        source = throttle_source(address)
        facts: dict[str, object] = {"rpc": "IssueToken", "source": source}
        wait = self._throttle.begin(client_id, source)
        if wait:
            known = await self._store.client(client_id)
            await self._record_refusal(
                AuditAction.AUDIT_ACTION_AUTH_FAILURE,
                tenant=known.tenant if known else UNKNOWN_TENANT,
                actor=client_id,
                target=client_id,
                details={**facts, "reason": "throttled"},
            )
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many failed attempts for this client; retry later",
                retry_info(wait),
            )
        client = await self._store.client(client_id)
        matched = await self._hasher.matches(client.secret_hash if client else "", secret)
        if client is None or not matched or client.state != CLIENT_ENABLED:
            if client is None:
                reason = "unknown client"
            elif client.state != CLIENT_ENABLED:
                reason = f"client {client.state}"
            else:
                reason = "wrong secret"
            await self._record_refusal(
                AuditAction.AUDIT_ACTION_AUTH_FAILURE,
                tenant=client.tenant if client else UNKNOWN_TENANT,
                actor=client_id,
                target=client_id,
                details={**facts, "reason": reason},
            )
            # One answer for an unknown id, a wrong secret and a client that may no longer get
            # tokens: no hint which it was (the audit has the real reason).
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        self._throttle.succeeded(client_id, source)
        granted = set(client.scopes.split()) | (await self._policy.fresh()).role_scopes(
            client.roles.split()
        )
        wanted = list(dict.fromkeys(request.scopes)) or sorted(granted)
        for scope in wanted:
            if scope not in granted:
                await self._record_refusal(
                    AuditAction.AUDIT_ACTION_PERMISSION_DENIED,
                    tenant=client.tenant,
                    actor=client_id,
                    target=client_id,
                    details={"rpc": "IssueToken", "reason": "scope not granted", "scope": scope},
                )
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"scope {scope} is not granted to this client",
                )
        try:
            issued = await self._tokens.issue(client, wanted)
        except NoSigningKey as error:
            log.error("cannot sign", extra={"error": str(error)})
            await abort(context, grpc.StatusCode.UNAVAILABLE, "signing key unavailable")
        # Before the token leaves: a token that was handed out is always in the trail.
        await self._record_required(
            context,
            AuditAction.AUDIT_ACTION_TOKEN_ISSUE,
            SUCCESS,
            tenant=client.tenant,
            actor=client_id,
            target=client_id,
            details={
                "token_id": issued.token_id,
                "scopes": wanted,
                "expires_in": issued.expires_in,
            },
        )
        return auth_pb2.IssueTokenResponse(
            access_token=issued.token,
            token_type="Bearer",  # noqa: S106 - the RFC 6750 scheme name
            expires_in=issued.expires_in,
            scopes=wanted,
            token_id=issued.token_id,
        )

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        rows = await self._store.keys(KEY_ACTIVE, KEY_VERIFYING)
        jwks = {"keys": [public_jwk(row.kid, row.public_x) for row in rows]}
        return auth_pb2.GetJwksResponse(jwks_json=json.dumps(jwks, separators=(",", ":")))

    async def VerifyToken(
        self, request: auth_pb2.VerifyTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.VerifyTokenResponse:
        try:
            principal = await self._tokens.verify(request.token)
        except TokenError as error:
            await self._refuse_token(context, error, {"rpc": "VerifyToken"})
        return auth_pb2.VerifyTokenResponse(
            caller=common_pb2.Caller(
                subject=principal.subject,
                tenant=principal.tenant,
                scopes=sorted(principal.scopes),
                roles=principal.roles,
            ),
            token_id=principal.token_id,
            expires_at=timestamp(principal.expires_at),
        )

    async def GetRevocations(
        self, request: auth_pb2.GetRevocationsRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetRevocationsResponse:
        revoked, disabled, as_of = await self._store.revocations()
        return auth_pb2.GetRevocationsResponse(
            revoked_tokens=[revoked_pb(row) for row in revoked],
            disabled_clients=disabled,
            as_of=timestamp(as_of),
        )

    async def GetPolicy(
        self, request: auth_pb2.GetPolicyRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetPolicyResponse:
        # Checked on every call: a gateway's next refresh carries a change made on any replica.
        policy = await self._policy.fresh(force=True)
        return auth_pb2.GetPolicyResponse(
            version=policy.version,
            policy_version=policy.number,
            tenants=[
                auth_pb2.TenantPolicy(tenant=name, allowed_tools=tools)
                for name, tools in sorted(policy.tenants.items())
            ],
            roles=[
                auth_pb2.RoleScopes(role=role, scopes=scopes)
                for role, scopes in sorted(policy.roles.items())
            ],
        )

    async def GetServiceInfo(
        self, request: auth_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetServiceInfoResponse:
        return auth_pb2.GetServiceInfoResponse(info=service_info("auth", CONTRACT_VERSIONS))
