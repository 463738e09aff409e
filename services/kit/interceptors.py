"""Server-side guard around every unary handler: request id, access log, no leaked exceptions."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from services.kit.context import REQUEST_ID_METADATA_KEY, request_id_var
from services.kit.metrics import meter

log = logging.getLogger("toolmesh.rpc")

_Handler = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


# A request id a caller may set: it travels into logs, spans and audit rows, so anything else
# (too long, control characters, undecodable bytes) is ignored rather than stored.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(details: grpc.HandlerCallDetails) -> str:
    """The caller's ``x-request-id`` when it is a well-formed id, else ""."""
    for item in details.invocation_metadata or ():
        if item.key == REQUEST_ID_METADATA_KEY:
            value = item.value
            if isinstance(value, bytes):
                value = value.decode("ascii", errors="replace")
            return value if _REQUEST_ID.fullmatch(value) else ""
    return ""


class GuardInterceptor(aio.ServerInterceptor):
    """Binds the request id to the handler's context, logs each call, hides internal errors.

    Written here because grpc ships no such interceptor: the wrap has to happen inside the
    handler (not in intercept_service) for context variables to reach the handler's code.
    """

    def __init__(self) -> None:
        self._duration = meter().create_histogram(
            "toolmesh.rpc.server.duration",
            unit="ms",
            description="Server-side duration of each unary RPC, by method and status code.",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        request_id = request_id_of(handler_call_details)
        inner: _Handler = handler.unary_unary
        duration = self._duration

        async def guarded(request: Any, context: aio.ServicerContext) -> Any:
            token = request_id_var.set(request_id)
            started = time.perf_counter()
            try:
                return await inner(request, context)
            except aio.AbortError:
                raise
            except Exception:
                # The exception text may carry secrets or internals: log it, answer generically.
                incident = uuid.uuid4().hex[:12]
                log.exception("unhandled error", extra={"method": method, "incident": incident})
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"
                )
            finally:
                code = context.code()
                elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
                code_name = code.name if isinstance(code, grpc.StatusCode) else "OK"
                duration.record(
                    elapsed_ms, {"rpc.method": method, "rpc.grpc.status_code": code_name}
                )
                level = logging.DEBUG if code_name == "OK" else logging.INFO
                log.log(
                    level,
                    "rpc",
                    extra={"method": method, "code": code_name, "duration_ms": elapsed_ms},
                )
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
