"""Per-request context that logs and spans pick up without threading it through every call."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID_METADATA_KEY = "x-request-id"
# The address of the gateway's caller, forwarded to auth with IssueToken (auth trusts it only
# from the gateway's certificate) so failed secrets are throttled per client and address.
CLIENT_ADDRESS_METADATA_KEY = "x-toolmesh-client-address"

request_id_var: ContextVar[str] = ContextVar("toolmesh_request_id", default="")

# The address of the caller a gateway forwards a call for (IssueToken), as the gateway saw it:
# an IP address, or the peer string of grpc's context.peer() ("ipv4:1.2.3.4:5678"). Inner
# services trust it only from a peer whose role is gateway (services.kit.peers).
CLIENT_ADDRESS_METADATA_KEY = "x-toolmesh-client-address"
