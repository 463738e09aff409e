"""The toolmesh.auth.v1.Auth servicer: the public RPCs (services.auth.public) and the admin RPCs
(services.auth.admin) over shared dependencies (services.auth.base)."""

from __future__ import annotations

from services.auth.admin import AdminRpcs
from services.auth.public import PublicRpcs
from toolmesh.auth.v1 import auth_pb2_grpc


class AuthServicer(PublicRpcs, AdminRpcs, auth_pb2_grpc.AuthServicer):
    """Every RPC of the contract; the generated base answers UNIMPLEMENTED for none of them."""
