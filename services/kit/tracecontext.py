"""Trace context from outside the mesh is a claim, not a parent.

A caller of the public gateway could send a ``traceparent`` naming another tenant's trace (and
join it, reading its spans back), or one with the sampled flag off (so that its requests leave
no spans). The gateway therefore starts a new trace for every call and keeps the caller's
context only as a span link: the caller can still correlate its own trace with ours, but can
neither join nor steer ours. Inner services keep W3C propagation from their (authenticated)
mesh peers as usual.

``UntrustedTraceContext`` is a server interceptor installed outside the tracing interceptor:
it hides the propagation headers from it and remembers the caller's context for the handler,
which links it to its server span with ``link_caller_context``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.kit.interceptors import UNTRACED_PREFIXES, drive_stream

# W3C trace context and baggage: what a tracing interceptor would take a parent from.
PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})

_caller_context: ContextVar[trace.SpanContext | None] = ContextVar(
    "toolmesh_caller_trace_context", default=None
)
_PROPAGATOR = TraceContextTextMapPropagator()


def caller_span_context(metadata: Any) -> trace.SpanContext | None:
    """The caller's valid W3C span context from call metadata, if it sent one."""
    carrier = {
        key: value
        for key, value in (metadata or ())
        if key in PROPAGATION_KEYS and isinstance(value, str)
    }
    if "traceparent" not in carrier:
        return None
    context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    return context if context.is_valid else None


def link_caller_context(span: trace.Span) -> None:
    """Link ``span`` to the context the caller sent, if any (call inside the handler)."""
    context = _caller_context.get()
    if context is not None:
        span.add_link(context, {"toolmesh.link": "caller"})


class _WithoutPropagation:
    """The servicer context with the propagation headers left out of its metadata."""

    def __init__(self, context: aio.ServicerContext) -> None:
        self._context = context

    def invocation_metadata(self) -> tuple[Any, ...]:
        return tuple(
            item
            for item in self._context.invocation_metadata() or ()
            if item[0] not in PROPAGATION_KEYS
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


_Unary = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


class UntrustedTraceContext(aio.ServerInterceptor):
    """Outermost interceptor of a public service: every call starts a new trace."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or (handler_call_details.method or "").startswith(UNTRACED_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            inner: _Unary = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                _caller_context.set(caller_span_context(context.invocation_metadata()))
                return await inner(request, _WithoutPropagation(context))

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> None:
                _caller_context.set(caller_span_context(context.invocation_metadata()))
                # Either style of handler: an async generator, or one that writes itself.
                await drive_stream(streaming(request, _WithoutPropagation(context)), context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
