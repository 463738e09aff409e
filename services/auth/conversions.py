"""Rows of auth's database as toolmesh.auth.v1 messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.auth.models import (
    CLIENT_DELETED,
    CLIENT_DISABLED,
    CLIENT_ENABLED,
    CLIENT_REVOKED,
    KEY_ACTIVE,
    KEY_RETIRED,
    KEY_VERIFYING,
    ClientRow,
    RevokedTokenRow,
    SigningKeyRow,
)
from toolmesh.auth.v1 import auth_pb2

_CLIENT_STATES = {
    CLIENT_ENABLED: auth_pb2.CLIENT_STATE_ENABLED,
    CLIENT_DISABLED: auth_pb2.CLIENT_STATE_DISABLED,
    CLIENT_REVOKED: auth_pb2.CLIENT_STATE_REVOKED,
    CLIENT_DELETED: auth_pb2.CLIENT_STATE_DELETED,
}
_KEY_STATES = {
    KEY_ACTIVE: auth_pb2.KEY_STATE_ACTIVE,
    KEY_VERIFYING: auth_pb2.KEY_STATE_VERIFYING,
    KEY_RETIRED: auth_pb2.KEY_STATE_RETIRED,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def client_pb(row: ClientRow) -> auth_pb2.Client:
    return auth_pb2.Client(
        client_id=row.client_id,
        tenant=row.tenant,
        scopes=row.scopes.split(),
        roles=row.roles.split(),
        state=_CLIENT_STATES[row.state],
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def key_pb(row: SigningKeyRow) -> auth_pb2.SigningKey:
    return auth_pb2.SigningKey(
        kid=row.kid,
        alg=row.alg,
        state=_KEY_STATES[row.state],
        created_at=timestamp(row.created_at),
        state_changed_at=timestamp(row.state_changed_at),
        dev=row.dev,
        signs_from=timestamp(row.signs_from),
    )


def revoked_pb(row: RevokedTokenRow) -> auth_pb2.RevokedToken:
    return auth_pb2.RevokedToken(
        token_id=row.jti, expires_at=timestamp(row.expires_at), tenant=row.tenant
    )
