"""The toolmesh.auth.v1.Auth servicer: the public RPCs (services.auth.public), the admin RPCs
(services.auth.admin) and the tenant and policy RPCs (services.auth.tenants) over shared
dependencies (services.auth.base)."""

from __future__ import annotations

from services.auth.public import PublicRpcs
from services.auth.tenants import TenantRpcs
from toolmesh.auth.v1 import auth_pb2_grpc


class AuthServicer(PublicRpcs, TenantRpcs, auth_pb2_grpc.AuthServicer):
    """Every RPC of the contract; the generated base answers UNIMPLEMENTED for none of them."""
