"""Start-up and shutdown shared by every toolmesh server.

One grpc.aio server per process with standard health checking and reflection. SIGTERM or
SIGINT flips health to NOT_SERVING (so balancers stop sending), stops accepting new calls and
gives in-flight ones ``grace_period_s`` to finish, then runs the service's own clean-up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.kit.interceptors import GuardInterceptor
from services.kit.logs import configure_logging
from services.kit.metrics import configure_metrics
from services.kit.peers import PeerAuthorizer, PeerRules, PeerRulesError, parse_aliases
from services.kit.settings import Environment, ServiceSettings
from services.kit.tls import TlsFiles, client_credentials, configure_client_tls
from services.kit.tracecontext import UntrustedTraceContext
from services.kit.tracing import configure_tracing

log = logging.getLogger("toolmesh.server")

Cleanup = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Registered:
    """What a service registered: its full service names, optionally a readiness wait, and
    the peer rules of an inner service.

    With ``ready`` set, health stays NOT_SERVING until it returns, so balancers and probes
    do not send traffic before the service can answer (the gateway waits for auth's keys).
    ``peers`` names, for every RPC served, the mesh roles that may call it
    (services.kit.peers); None means a public service whose callers carry no mesh identity.
    """

    names: Sequence[str]
    ready: Callable[[], Awaitable[None]] | None = None
    peers: PeerRules | None = None


# Registers servicers on the server: returns the full service names it added, or Registered.
Register = Callable[[aio.Server], Awaitable[Sequence[str] | Registered]]
SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


@dataclass
class Running:
    """A started server, for tests and for the process entry point."""

    server: aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: Sequence[str]
    cleanups: list[Cleanup] = field(default_factory=list)
    readiness: asyncio.Task[None] | None = None

    async def stop(self, grace: float) -> None:
        if self.readiness is not None:
            self.readiness.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await _run_cleanups(self.cleanups)


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        # A port clash must fail loudly, not silently share the port with another server.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        # Headers up to 32 KiB reach the service, so its own caps (the gateway's 8 KiB token
        # cap) answer an oversized token with UNAUTHENTICATED, not a transport error.
        ("grpc.max_metadata_size", 32 * 1024),
        ("grpc.absolute_max_metadata_size", 32 * 1024),
    ]


class StartupRefused(RuntimeError):
    """The configuration is unsafe for the environment it runs in."""


def tls_files(settings: ServiceSettings) -> TlsFiles | None:
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file and settings.tls_key_file and settings.tls_ca_file
    return TlsFiles.load(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def check_environment(settings: ServiceSettings) -> None:
    """Production refuses plaintext, and an inner service that would take calls from peers it
    cannot identify; dev on loopback may run without TLS but says so."""
    prefix = f"TOOLMESH_{settings.service_name.upper()}_"
    if settings.env is Environment.PRODUCTION:
        if not settings.tls_enabled:
            raise StartupRefused(
                f"{settings.service_name}: TOOLMESH_ENV=production requires mutual TLS; set "
                "TOOLMESH_TLS_CERT_FILE, TOOLMESH_TLS_KEY_FILE and TOOLMESH_TLS_CA_FILE "
                "(`make certs` makes a dev CA)"
            )
        if settings.inner and not settings.tls_require_client_auth:
            raise StartupRefused(
                f"{settings.service_name}: an inner service must require client certificates "
                f"in production; unset {prefix}TLS_REQUIRE_CLIENT_AUTH (it defaults to true)"
            )
        if settings.inner and not settings.peer_allowlist:
            raise StartupRefused(
                f"{settings.service_name}: set {prefix}ALLOWED_PEERS to the certificate names "
                "that may call it (an empty allowlist would admit every mesh certificate)"
            )
    if settings.tls_enabled:
        return
    log.warning(
        "TLS is off: plaintext gRPC, acceptable only for local development",
        extra={"address": settings.address},
    )


async def start(
    settings: ServiceSettings, register: Register, cleanups: Sequence[Cleanup] = ()
) -> Running:
    """Start serving; ``cleanups`` run (in reverse) after the server stops."""
    files = tls_files(settings)
    interceptors: list[aio.ServerInterceptor] = [aio_server_interceptor(), GuardInterceptor()]
    if not settings.inner:
        # Callers from outside the mesh never choose our trace (services.kit.tracecontext).
        interceptors.insert(0, UntrustedTraceContext())
    # Rules arrive with register(); the server serves nothing before it has them.
    authorizer = PeerAuthorizer(None, settings.peer_allowlist, parse_aliases(settings.peer_aliases))
    if files and settings.tls_require_client_auth:
        interceptors.append(authorizer)
    server = aio.server(
        interceptors=interceptors,
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    registered = await register(server)
    if not isinstance(registered, Registered):
        registered = Registered(list(registered))
    names = list(registered.names)
    try:
        if registered.peers is not None:
            registered.peers.check_covers(names)
        elif settings.inner and authorizer in interceptors:
            raise PeerRulesError("an inner service must say which peers may call each RPC")
    except PeerRulesError as error:
        await _run_cleanups(list(cleanups))
        raise StartupRefused(f"{settings.service_name}: {error}") from None
    authorizer.rules = registered.peers
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        if files:
            port = server.add_secure_port(
                settings.address, files.server_credentials(settings.tls_require_client_auth)
            )
        else:
            port = server.add_insecure_port(settings.address)
        if port == 0:
            raise RuntimeError(f"cannot bind {settings.address}")
        await server.start()
    except BaseException:
        # Whatever register() started (tasks, pools) must not outlive a failed start.
        await _run_cleanups(list(cleanups))
        raise
    running = Running(
        server=server,
        health=health_servicer,
        port=port,
        service_names=names,
        cleanups=list(cleanups),
    )
    if registered.ready is None:
        await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.SERVING)
    else:
        await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.NOT_SERVING)
        running.readiness = asyncio.create_task(
            _serve_when_ready(health_servicer, names, registered.ready)
        )
    return running


async def _set_health(
    servicer: health.aio.HealthServicer, names: Sequence[str], status: int
) -> None:
    for name in ["", *names]:
        await servicer.set(name, status)


async def _serve_when_ready(
    servicer: health.aio.HealthServicer, names: Sequence[str], ready: Callable[[], Awaitable[None]]
) -> None:
    await ready()
    await _set_health(servicer, names, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready")


async def _run_cleanups(cleanups: list[Cleanup]) -> None:
    for cleanup in reversed(cleanups):
        try:
            await cleanup()
        except Exception:
            log.exception("clean-up failed")


async def _serve(settings: ServiceSettings, register: Register, cleanups: list[Cleanup]) -> None:
    running = await start(settings, register, cleanups)
    log.info(
        "serving",
        extra={
            "address": f"{settings.host}:{running.port}",
            "services": list(running.service_names),
            "env": settings.env.value,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_s": settings.grace_period_s})
    await running.stop(settings.grace_period_s)
    log.info("stopped")


def run_service(
    settings: SettingsT,
    build: Callable[[SettingsT, list[Cleanup]], Register],
) -> None:
    """Process entry point: logs, tracing, metrics, serve until a signal, drain, flush."""
    configure_logging(settings.service_name, settings.log_level)
    try:
        check_environment(settings)
    except StartupRefused as refused:
        log.critical(str(refused))
        raise SystemExit(2) from None
    configure_client_tls(tls_files(settings))
    provider = configure_tracing(
        settings.service_name,
        settings.otlp_endpoint,
        settings.trace_sample_ratio,
        client_credentials(),
    )
    meters = configure_metrics(
        settings.service_name, settings.host, settings.effective_metrics_port
    )
    cleanups: list[Cleanup] = []
    try:
        asyncio.run(_serve(settings, build(settings, cleanups), cleanups))
    except StartupRefused as refused:
        # Raised while registering (e.g. a schema this release does not know): say why, exit 2.
        log.critical("refusing to start: %s", refused)
        raise SystemExit(2) from None
    finally:
        provider.shutdown()
        meters.shutdown()


__all__ = ["Cleanup", "Register", "Registered", "Running", "grpc", "run_service", "start"]
