"""Client channels to other toolmesh services, with trace context, request ids and retry policy.

One span per hop: a call carries the caller's W3C trace context (and request id) in its
metadata, and the callee's server span is the hop's span, a child of the caller's current
span. No client span is recorded as well: it doubled the spans recorded, exported and stored
per hop for a duration the server span already gives, less the network time on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry import propagate

from services.kit.context import REQUEST_ID_METADATA_KEY, request_id_var
from services.kit.tls import client_credentials


def _with_context(client_call_details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    """The call with the current trace context and request id added to its metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    request_id = request_id_var.get()
    if request_id:
        carrier[REQUEST_ID_METADATA_KEY] = request_id
    if not carrier:
        return client_call_details
    metadata = aio.Metadata(*(client_call_details.metadata or ()))
    for key, value in carrier.items():
        metadata.add(key, value)
    return aio.ClientCallDetails(
        client_call_details.method,
        client_call_details.timeout,
        metadata,
        client_call_details.credentials,
        client_call_details.wait_for_ready,
    )


class _ContextInterceptor(aio.UnaryUnaryClientInterceptor):
    """Forwards the trace context and the current request id, so every hop's server span joins
    the caller's trace and every hop logs under the same id."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_context(client_call_details), request)


class _StreamContextInterceptor(aio.UnaryStreamClientInterceptor):
    """The same for server-streaming calls."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_context(client_call_details), request)


def retry_policy(
    services: Sequence[str],
    *,
    max_attempts: int = 3,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 0.5,
    retryable: Sequence[str] = ("UNAVAILABLE",),
    methods: Sequence[str] = (),
) -> dict[str, Any]:
    """A gRPC service-config retry policy; only give it idempotent methods.

    ``services`` must be fully qualified (toolmesh.memory.v1.Memory) or nothing retries.
    """
    names: list[dict[str, str]] = []
    for service in services:
        if methods:
            names.extend({"service": service, "method": m} for m in methods)
        else:
            names.append({"service": service})
    return {
        "name": names,
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": f"{initial_backoff_s}s",
            "maxBackoff": f"{max_backoff_s}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(retryable),
        },
    }


def open_channel(
    target: str,
    method_configs: Sequence[dict[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    extra_interceptors: Sequence[aio.ClientInterceptor] = (),
) -> aio.Channel:
    """A channel with client-side round-robin balancing and a retry budget.

    ``target`` may be host:port, a comma list of host:port, ``ipv4:a:p1,b:p2`` or
    ``dns:///name:port``. Uses mTLS when the process was configured with a certificate.
    """
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": list(method_configs),
        # Retry budget: retries stop when more than half the recent calls failed.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    interceptors: list[Any] = [
        _ContextInterceptor(),
        _StreamContextInterceptor(),
        *extra_interceptors,
    ]
    target = normalize_target(target)
    credentials = credentials or client_credentials()
    if credentials is not None:
        if target.startswith("ipv4:"):
            # A static list has no single authority; verify each server's certificate
            # against the first address (certificates for a static list carry its IPs).
            first_host = target[len("ipv4:") :].split(",")[0].rsplit(":", 1)[0]
            options.append(("grpc.ssl_target_name_override", first_host))
        return aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return aio.insecure_channel(target, options=options, interceptors=interceptors)


def normalize_target(target: str) -> str:
    """Turn "h1:p1,h2:p2" into gRPC's ``ipv4:`` list so round_robin spreads over them."""
    if "," in target and ":///" not in target and not target.startswith("ipv4:"):
        return "ipv4:" + ",".join(part.strip() for part in target.split(","))
    return target


__all__ = ["grpc", "open_channel", "retry_policy"]
