"""Per-request context that logs and spans pick up without threading it through every call."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID_METADATA_KEY = "x-request-id"

request_id_var: ContextVar[str] = ContextVar("toolmesh_request_id", default="")
