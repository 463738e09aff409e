"""Start-up and shutdown shared by every toolmesh server.

One grpc.aio server per process with standard health checking and reflection. SIGTERM or
SIGINT flips health to NOT_SERVING (so balancers stop sending), stops accepting new calls and
gives in-flight ones ``grace_period_s`` to finish, then runs the service's own clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from services.kit.interceptors import DecodeGuard, GuardInterceptor, TracingInterceptor
from services.kit.logs import LIMITER, configure_logging
from services.kit.metrics import configure_metrics
from services.kit.peers import PeerAuthorizer, PeerRules, PeerRulesError, parse_aliases
from services.kit.settings import Environment, ServiceSettings
from services.kit.startup import (
    StartupRefused,
    check_private,
    env_name,
    load_settings,
    private_process,
    refuse,
)
from services.kit.tls import TlsFiles, TlsFilesError, client_credentials, configure_client_tls
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


def tls_files(settings: ServiceSettings) -> TlsFiles | None:
    """The process's certificate, key and CA, checked to parse and to belong together."""
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file and settings.tls_key_file and settings.tls_ca_file
    try:
        return TlsFiles.load(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
    except TlsFilesError as error:
        name = env_name(type(settings), error.field)
        raise StartupRefused(
            f"{name}: {error}",
            setting=name,
            fix=f"point {name} at a readable PEM file ({error.expected}); `make certs` makes "
            "a development set",
        ) from None


def check_environment(settings: ServiceSettings) -> None:
    """Production refuses plaintext, an inner service that would take calls from peers it
    cannot identify, and data or keys readable by others; dev on loopback may run without TLS
    but says so."""
    cls = type(settings)
    if settings.env is Environment.PRODUCTION:
        if not settings.tls_enabled:
            names = ", ".join(env_name(cls, f) for f in ("tls_cert_file", "tls_key_file"))
            raise StartupRefused(
                f"{settings.service_name}: TOOLMESH_ENV=production requires mutual TLS",
                setting=f"{names}, {env_name(cls, 'tls_ca_file')}",
                fix="set all three (or the shared TOOLMESH_TLS_CERT_FILE, TOOLMESH_TLS_KEY_FILE "
                "and TOOLMESH_TLS_CA_FILE) to this service's PEM files (`make certs` makes a dev "
                "CA), or run with TOOLMESH_ENV=dev on loopback",
            )
        if settings.inner and not settings.tls_require_client_auth:
            name = env_name(cls, "tls_require_client_auth")
            raise StartupRefused(
                f"{name}=false: an inner service must require client certificates in production",
                setting=name,
                fix=f"unset {name} (it defaults to true)",
            )
        if settings.inner and not settings.peer_allowlist:
            name = env_name(cls, "allowed_peers")
            raise StartupRefused(
                f"{name} is empty: that would admit every certificate of the mesh CA",
                setting=name,
                fix=f"set {name} to the certificate names that may call it",
            )
        check_private(
            {
                env_name(cls, "data_dir"): settings.data_dir,
                env_name(cls, "tls_key_file"): settings.tls_key_file,
            }
        )
    if settings.tls_enabled:
        return
    log.warning(
        "TLS is off: plaintext gRPC, acceptable only for local development",
        extra={"address": settings.address},
    )


class HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer, plus ``List`` (a snapshot of every service's status), which the
    packaged one leaves unimplemented."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


async def start(
    settings: ServiceSettings,
    register: Register,
    cleanups: Sequence[Cleanup] = (),
    *,
    tracer_provider: TracerProvider | None = None,
) -> Running:
    """Start serving; ``cleanups`` run (in reverse) after the server stops.

    ``tracer_provider`` (tests) receives the server spans instead of the global provider.
    """
    files = tls_files(settings)
    interceptors: list[aio.ServerInterceptor] = [
        TracingInterceptor(tracer_provider),
        GuardInterceptor(),
    ]
    if not settings.inner:
        # Callers from outside the mesh never choose our trace (services.kit.tracecontext).
        interceptors.insert(0, UntrustedTraceContext())
    # Rules arrive with register(); the server serves nothing before it has them.
    authorizer = PeerAuthorizer(None, settings.peer_allowlist, parse_aliases(settings.peer_aliases))
    if files and settings.tls_require_client_auth:
        interceptors.append(authorizer)
    # Innermost: a peer that may not call a method learns nothing about its request's bytes.
    interceptors.append(DecodeGuard())
    server = aio.server(
        interceptors=interceptors,
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Bind first: a taken port fails before databases are opened and tasks started.
    try:
        port = _bind(server, settings, files)
    except BaseException:
        await _run_cleanups(list(cleanups))
        raise
    try:
        registered = await register(server)
        if not isinstance(registered, Registered):
            registered = Registered(list(registered))
        names = list(registered.names)
        if registered.peers is not None:
            registered.peers.check_covers(names)
        elif settings.inner and authorizer in interceptors:
            raise PeerRulesError("an inner service must say which peers may call each RPC")
        authorizer.rules = registered.peers
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        await server.start()
    except BaseException as error:
        # Whatever register() started (tasks, pools) must not outlive a failed start.
        await _run_cleanups(list(cleanups))
        await server.stop(None)
        if isinstance(error, PeerRulesError):
            raise StartupRefused(f"{settings.service_name}: {error}") from None
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


def _bind(server: aio.Server, settings: ServiceSettings, files: TlsFiles | None) -> int:
    """Listen on the configured address; a taken port or a foreign address is refused."""
    try:
        if files:
            port: int = server.add_secure_port(
                settings.address, files.server_credentials(settings.tls_require_client_auth)
            )
        else:
            port = int(server.add_insecure_port(settings.address))
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if port == 0:
        cls = type(settings)
        raise StartupRefused(
            f"cannot listen on {settings.address} (the port is taken or the address is not "
            "this host's)",
            setting=f"{env_name(cls, 'port')}, {env_name(cls, 'host')}",
            fix="choose a free port (`ss -ltnp` names the process holding one) and an address "
            "of this host",
        )
    return port


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


async def _flush_suppressed(every_s: float = 10.0) -> None:
    """Report rate-limited log lines even when their site has gone quiet."""
    while True:
        await asyncio.sleep(every_s)
        LIMITER.flush()


def _cancelled(task: asyncio.Task[None]) -> Cleanup:
    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        LIMITER.flush()

    return cancel


async def _serve(
    settings: ServiceSettings, register: Register, cleanups: list[Cleanup], started: list[bool]
) -> None:
    running = await start(settings, register, cleanups)
    started.append(True)
    # `toolmesh up` reads this line to know that its own child holds the port.
    log.info(
        "serving",
        extra={
            "address": f"{settings.host}:{running.port}",
            "port": running.port,
            "pid": os.getpid(),
            "services": list(running.service_names),
            "env": settings.env.value,
        },
    )
    flusher = asyncio.create_task(_flush_suppressed(), name="log-suppressed-report")
    running.cleanups.insert(0, _cancelled(flusher))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_s": settings.grace_period_s})
    await running.stop(settings.grace_period_s)
    log.info("stopped")


def build_from(module: str) -> Callable[[SettingsT, list[Cleanup]], Register]:
    """The ``build`` of ``module``, imported when called: a process whose settings are refused
    exits before importing the service's code (its databases, SDKs and handlers)."""

    def build(settings: SettingsT, cleanups: list[Cleanup]) -> Register:
        built: Register = importlib.import_module(module).build(settings, cleanups)
        return built

    return build


def run_service(
    settings: SettingsT | type[SettingsT],
    build: Callable[[SettingsT, list[Cleanup]], Register],
) -> None:
    """Process entry point: logs, tracing, metrics, serve until a signal, drain, flush.

    ``settings`` may be the settings class, so a bad environment variable is reported like any
    other start-up error: one CRITICAL line naming the variable and the fix, exit code 2, no
    traceback (services.kit.startup).
    """
    private_process()
    loaded: SettingsT | None = None
    try:
        if isinstance(settings, type):
            configure_logging(settings.service_name)
            loaded = load_settings(settings)
        else:
            loaded = settings
        configure_logging(loaded.service_name, loaded.log_level)
        check_environment(loaded)
        configure_client_tls(tls_files(loaded))
    except Exception as error:
        refuse(error, loaded)
    provider = configure_tracing(
        loaded.service_name,
        loaded.otlp_endpoint,
        loaded.trace_sample_ratio,
        client_credentials(),
    )
    meters = None
    started: list[bool] = []
    try:
        meters = _metrics(loaded)
        cleanups: list[Cleanup] = []
        asyncio.run(_serve(loaded, build(loaded, cleanups), cleanups, started))
    except Exception as error:
        if started:  # not a start-up error: a failure while serving or stopping
            log.exception("stopped on an unexpected error")
            raise SystemExit(1) from None
        # Raised while building or registering (a bad rules file, a database that cannot be
        # reached, a taken port ...): say which setting, exit 2.
        refuse(error, loaded)
    finally:
        provider.shutdown()
        if meters is not None:
            meters.shutdown()


def _metrics(settings: ServiceSettings) -> MeterProvider:
    try:
        return configure_metrics(
            settings.service_name, settings.host, settings.effective_metrics_port
        )
    except OSError as error:
        name = env_name(type(settings), "metrics_port")
        raise StartupRefused(
            f"cannot serve metrics on {settings.host}:{settings.effective_metrics_port}: "
            f"{error.strerror or error}",
            setting=name,
            fix=f"set {name} to a free port, or 0 to turn the /metrics endpoint off",
        ) from None


__all__ = [
    "Cleanup",
    "Register",
    "Registered",
    "Running",
    "StartupRefused",
    "grpc",
    "run_service",
    "start",
]
