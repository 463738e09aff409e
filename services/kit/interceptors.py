"""Server interceptors every toolmesh server runs, outermost first.

- ``TracingInterceptor``: a server span per RPC (W3C context from the caller). Unary RPCs go
  through OpenTelemetry's own interceptor; server-streaming ones are traced here, because that
  interceptor cannot run a handler that writes with ``context.write`` such as
  ``grpc.health.v1.Health/Watch`` (open-telemetry/opentelemetry-python-contrib#3066).
- ``GuardInterceptor``: request id, access log, no leaked exceptions, for unary and
  server-streaming RPCs.
- (``services.kit.peers.PeerAuthorizer`` when peers are authenticated.)
- ``DecodeGuard``: a request whose bytes do not parse answers INVALID_ARGUMENT "request could
  not be decoded" instead of grpc's UNKNOWN with the parser's text and a logged traceback.
  It runs innermost, so a peer that may not call the method learns nothing more.

Handlers may be coroutines, async generators or coroutines that write with ``context.write``;
``drive_stream`` runs any of them.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2
from grpc import aio
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.kit import errors
from services.kit.context import REQUEST_ID_METADATA_KEY, request_id_var
from services.kit.logs import LIMITER
from services.kit.metrics import meter

log = logging.getLogger("toolmesh.rpc")

_Handler = Callable[[Any, aio.ServicerContext], Any]
_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

# Infrastructure RPCs: probes call them every few seconds; a span each would be noise.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# A request id a caller may set: it travels into logs, spans and audit rows, so anything else
# (too long, control characters, undecodable bytes) is ignored rather than stored.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

UNDECODABLE_MESSAGE = "request could not be decoded"


def request_id_of(details: grpc.HandlerCallDetails) -> str:
    """The caller's ``x-request-id`` when it is a well-formed id, else ""."""
    for item in details.invocation_metadata or ():
        if item.key == REQUEST_ID_METADATA_KEY:
            value = item.value
            if isinstance(value, bytes):
                value = value.decode("ascii", errors="replace")
            return value if _REQUEST_ID.fullmatch(value) else ""
    return ""


async def drive_stream(result: Any, context: aio.ServicerContext) -> None:
    """Run a server-streaming handler's result: an async iterator's items are written to the
    call; a coroutine (a handler that writes with ``context.write`` itself) is awaited."""
    if hasattr(result, "__aiter__"):
        iterator: AsyncIterator[Any] = result
        async for item in iterator:
            await context.write(item)
    elif inspect.isawaitable(result):
        await result


def _rebuild(
    handler: grpc.RpcMethodHandler,
    unary_unary: _Handler | None = None,
    unary_stream: _Handler | None = None,
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    request_deserializer = deserializer or handler.request_deserializer
    if unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    assert unary_stream is not None
    return grpc.unary_stream_rpc_method_handler(
        unary_stream,
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TracingInterceptor(aio.ServerInterceptor):
    """OpenTelemetry server spans for unary and streaming RPCs alike."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._unary = aio_server_interceptor(tracer_provider=tracer_provider)
        self._tracer = trace.get_tracer("toolmesh.kit.server", tracer_provider=tracer_provider)

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        if handler.unary_stream is not None:
            return _rebuild(handler, unary_stream=self._traced_stream(handler.unary_stream, method))
        if handler.unary_unary is None and handler.stream_unary is None:
            return handler  # bidirectional streams: none are served; left untraced

        async def resolved(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

        wrapped: grpc.RpcMethodHandler = await self._unary.intercept_service(
            resolved, handler_call_details
        )
        return wrapped

    def _traced_stream(self, inner: _Handler, method: str) -> _Handler:
        service, _, name = method.lstrip("/").partition("/")
        tracer = self._tracer

        async def traced(request: Any, context: aio.ServicerContext) -> None:
            carrier = {
                item.key: item.value
                for item in context.invocation_metadata() or ()
                if isinstance(item.value, str)
            }
            with tracer.start_as_current_span(
                method,
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            ) as span:
                try:
                    await drive_stream(inner(request, context), context)
                finally:
                    code = context.code()
                    status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", status.value[0])
                    if status is not grpc.StatusCode.OK:
                        span.set_status(trace.Status(trace.StatusCode.ERROR, status.name))

        return traced


# Status codes a caller can cause at will: their access-log lines are rate-limited per method.
_CALLER_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
        "UNIMPLEMENTED",
    }
)


class GuardInterceptor(aio.ServerInterceptor):
    """Binds the request id to the handler's context, logs each call, hides internal errors.

    Written here because grpc ships no such interceptor: the wrap has to happen inside the
    handler (not in intercept_service) for context variables to reach the handler's code.
    """

    def __init__(self) -> None:
        self._duration = meter().create_histogram(
            "toolmesh.rpc.server.duration",
            unit="ms",
            description="Server-side duration of each RPC, by method and status code.",
        )

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        request_id = request_id_of(handler_call_details)
        if handler.unary_unary is not None:
            inner: _Handler = handler.unary_unary

            async def guarded(request: Any, context: aio.ServicerContext) -> Any:
                return await self._guard(method, request_id, context, inner(request, context))

            return _rebuild(handler, unary_unary=guarded)
        if handler.unary_stream is not None:
            inner_stream: _Handler = handler.unary_stream

            async def guarded_stream(request: Any, context: aio.ServicerContext) -> None:
                await self._guard(
                    method,
                    request_id,
                    context,
                    drive_stream(inner_stream(request, context), context),
                )

            return _rebuild(handler, unary_stream=guarded_stream)
        return handler

    async def _guard(
        self, method: str, request_id: str, context: aio.ServicerContext, work: Awaitable[Any]
    ) -> Any:
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            return await work
        except aio.AbortError:
            raise
        except NotImplementedError:
            # A generated base class's "Method not implemented!" after set_code(UNIMPLEMENTED).
            if context.code() is grpc.StatusCode.UNIMPLEMENTED:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
            await self._internal(method, context)
        except Exception:
            await self._internal(method, context)
        finally:
            code = context.code()
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            code_name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            self._duration.record(
                elapsed_ms, {"rpc.method": method, "rpc.grpc.status_code": code_name}
            )
            extra = {"method": method, "code": code_name, "duration_ms": elapsed_ms}
            if code_name == "OK":
                log.debug("rpc", extra=extra)
            elif code_name in _CALLER_CODES:
                LIMITER.log(log, logging.INFO, f"rpc {method} {code_name}", "rpc", extra)
            else:
                log.info("rpc", extra=extra)
            request_id_var.reset(token)

    @staticmethod
    async def _internal(method: str, context: aio.ServicerContext) -> None:
        # The exception text may carry secrets or internals: log it, answer generically.
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error", extra={"method": method, "incident": incident})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse, until ``DecodeGuard`` refuses it."""

    size: int
    error: str


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning ``Undecodable`` instead of raising on bad bytes."""
    if deserializer is None:
        return None
    parse = deserializer

    def parse_or_mark(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as error:  # DecodeError, invalid UTF-8 in a string field, ...
            return Undecodable(size=len(raw), error=type(error).__name__)

    return parse_or_mark


class DecodeGuard(aio.ServerInterceptor):
    """INVALID_ARGUMENT for requests that do not parse, with a rate-limited log line."""

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        deserializer = tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner: _Handler = handler.unary_unary

            async def checked(request: Any, context: aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await _refuse(method, request, context)
                return await inner(request, context)

            return _rebuild(handler, unary_unary=checked, deserializer=deserializer)
        if handler.unary_stream is not None:
            inner_stream: _Handler = handler.unary_stream

            async def checked_stream(request: Any, context: aio.ServicerContext) -> None:
                if isinstance(request, Undecodable):
                    await _refuse(method, request, context)
                await drive_stream(inner_stream(request, context), context)

            return _rebuild(handler, unary_stream=checked_stream, deserializer=deserializer)
        return handler


async def _refuse(method: str, request: Undecodable, context: aio.ServicerContext) -> NoReturn:
    await abort_undecodable(context, method, request.size, request.error)


async def abort_undecodable(
    context: aio.ServicerContext, method: str, size: int, error: str
) -> NoReturn:
    """INVALID_ARGUMENT "request could not be decoded", for handlers that parse their request
    bytes themselves; logs a rate-limited line with the size and error type, never the bytes."""
    LIMITER.log(
        log,
        logging.INFO,
        f"undecodable {method}",
        "undecodable request",
        {"method": method, "bytes": size, "error": error},
    )
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="request", description="the bytes are not a valid message of this method's type"
    )
    await errors.abort(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        UNDECODABLE_MESSAGE,
        error_details_pb2.BadRequest(field_violations=[violation]),
    )
