"""Process entry point: ``python -m mcpface``.

JSON logs, tracing and metrics from the kit, the same production checks as every service
(TOOLMESH_ENV=production refuses to start without TLS), one gRPC channel to the gateway
(mutual TLS when this process has a certificate), and uvicorn serving the ASGI app. SIGTERM
turns readiness off at once, stops accepting connections and gives requests in flight
``grace_period_s`` to finish; then the channels close and spans are flushed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn
from grpc import aio

from mcpface.server import Readiness, build_app
from mcpface.settings import McpFaceSettings
from services.kit.channels import normalize_target, open_channel, retry_policy
from services.kit.logs import configure_logging
from services.kit.metrics import configure_metrics
from services.kit.server import StartupRefused, check_environment, tls_files
from services.kit.tls import client_credentials, configure_client_tls
from services.kit.tracing import configure_tracing

log = logging.getLogger("toolmesh.mcpface")

GATEWAY_SERVICE = "toolmesh.gateway.v1.Gateway"


class _Server(uvicorn.Server):
    """uvicorn, with readiness turned off the moment a stop signal arrives, and the signal
    not raised again after the drain (uvicorn's default, which would end the process before
    the channels close and the spans are flushed)."""

    def __init__(self, config: uvicorn.Config, readiness: Readiness) -> None:
        super().__init__(config)
        self._readiness = readiness

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._readiness.draining:
            log.info("draining", extra={"signal": signal.Signals(sig).name})
        self._readiness.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        self.should_exit = True


def gateway_channels(settings: McpFaceSettings) -> tuple[aio.Channel, aio.Channel]:
    """The channel calls go over (tracing, request ids, retries of the idempotent reads only:
    a tools/call is never retried by the transport), and a bare one for readiness checks."""
    calls = open_channel(
        settings.gateway_target,
        [retry_policy([GATEWAY_SERVICE], methods=["ListTools", "GetServiceInfo"])],
    )
    target = normalize_target(settings.gateway_target)
    options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
    credentials = client_credentials()
    health = (
        aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else aio.insecure_channel(target, options=options)
    )
    return calls, health


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before serving so a port of 0 is known and a clash fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(settings: McpFaceSettings) -> None:
    calls, health = gateway_channels(settings)
    try:
        app, readiness = build_app(settings, calls, health)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=max(1, round(settings.grace_period_s)),
            limit_concurrency=settings.max_concurrent_rpcs,
            ssl_certfile=settings.tls_cert_file if settings.tls_enabled else None,
            ssl_keyfile=settings.tls_key_file if settings.tls_enabled else None,
        )
        server = _Server(config, readiness)
        sock = bind(settings.host, settings.port)
        host, port = sock.getsockname()[:2]
        log.info(
            "serving",
            extra={
                "address": f"{host}:{port}",
                # What `toolmesh up` checks: this process listens on its port.
                "pid": os.getpid(),
                "port": port,
                "path": settings.path,
                "gateway": settings.gateway_target,
                "env": settings.env.value,
                "https": settings.tls_enabled,
            },
        )
        await server.serve(sockets=[sock])
        log.info("stopped")
    finally:
        await calls.close()
        await health.close()


def main() -> None:
    settings = McpFaceSettings()
    configure_logging(settings.service_name, settings.log_level)
    # uvicorn's own start/stop lines go through the same JSON handler.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
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
    try:
        asyncio.run(serve(settings))
    finally:
        provider.shutdown()
        meters.shutdown()
