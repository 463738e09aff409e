"""Wiring: rules, registry, notes database, tool health, tool backends and the servicer, for the
kit's server."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from grpc import aio
from opentelemetry import trace

from services.kit.breaker import BreakerRegistry
from services.kit.channels import open_channel
from services.kit.db import create_engine, session_factory, sqlite_url
from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, GATEWAY, PeerRules
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import Environment, ServiceSettings
from services.kit.startup import setting_guard
from services.router.audit import RouterAudit
from services.router.backends.admin import BackendAdmin
from services.router.backends.manager import BackendManager, ManagerSettings
from services.router.backends.network import CommandPolicy, HostPolicy
from services.router.backends.store import BackendStore
from services.router.catalog import default_registry
from services.router.health import ToolHealth
from services.router.invoke import Executor
from services.router.migrations import MIGRATIONS
from services.router.models.admin import PromptAdmin
from services.router.models.prompts import PromptStore, load_seeds
from services.router.models.provider import ProviderConfig, build_providers, read_api_key
from services.router.models.routing import ModelRouter, ModelSettings
from services.router.notes import NotesStore
from services.router.registry import Registry
from services.router.routing import RoutePool, ToolRouter
from services.router.rules import load_rules
from services.router.servicer import RouterServicer, contract_message, routing_mode
from services.router.settings import RouterSettings
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
# Only the gateway routes and invokes for a caller (the tenant and scopes come from it).
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "Route": [GATEWAY],
        "InvokeTool": [GATEWAY],
        "ListTools": [GATEWAY],
        "GetServiceInfo": [ANY_PEER],
        "ResolveTool": [GATEWAY],
        "RegisterBackend": [GATEWAY],
        "ListBackends": [GATEWAY],
        "RemoveBackend": [GATEWAY],
        "ListToolVersions": [GATEWAY],
        "ApproveToolVersion": [GATEWAY],
        "PhraseAnswer": [GATEWAY],
        "ListPrompts": [GATEWAY],
        "GetPrompt": [GATEWAY],
        "PublishPrompt": [GATEWAY],
        "SelectPrompt": [GATEWAY],
    },
)
log = logging.getLogger("toolmesh.router")


def _tenants(text: str) -> frozenset[str]:
    return frozenset(t.strip() for t in text.split(",") if t.strip())


def provider_configs(settings: RouterSettings) -> list[ProviderConfig]:
    """The primary provider and the fallback, as configured (none: rules only)."""
    if not settings.model_enabled:
        return []
    configs = [
        ProviderConfig(
            "primary",
            settings.model_base_url,
            settings.model_name,
            read_api_key(settings.model_api_key_file, settings.model_api_key.get_secret_value()),
        )
    ]
    if settings.model_fallback_base_url:
        configs.append(
            ProviderConfig(
                "fallback",
                settings.model_fallback_base_url,
                settings.model_fallback_name,
                read_api_key(
                    settings.model_fallback_api_key_file,
                    settings.model_fallback_api_key.get_secret_value(),
                ),
            )
        )
    return configs


def model_settings(settings: RouterSettings) -> ModelSettings:
    return ModelSettings(
        tool_choice=settings.model_tool_choice,
        timeout_s=settings.model_timeout_s,
        route_max_tokens=settings.model_route_max_tokens,
        answer_max_tokens=settings.model_answer_max_tokens,
        max_history_tokens=settings.model_max_history_tokens,
        max_result_bytes=settings.model_max_result_bytes,
        max_tools=settings.model_max_tools,
        top_logprobs=settings.model_top_logprobs,
        temperature=settings.model_temperature,
        model_first=_tenants(settings.model_first_tenants),
        phrased=_tenants(settings.model_answer_tenants),
    )


def build(
    settings: ServiceSettings,
    cleanups: list[Cleanup],
    *,
    registry: Registry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Register:
    """Load and check rules and contracts now (a bad file fails start-up), serve later.

    Test hooks: ``registry`` replaces the published tools (for example to add a slow tool),
    ``tracer_provider`` receives the tool spans instead of the global provider, and ``clock``
    is the wall clock the tools read (fixed, for exact answers).
    """
    if not isinstance(settings, RouterSettings):
        raise TypeError("the router needs RouterSettings")
    plugins = [m.strip() for m in settings.plugin_modules.split(",") if m.strip()]
    with setting_guard(
        settings, "plugin_modules", "list importable modules that define TOOLS in {setting}"
    ):
        tools = registry if registry is not None else default_registry(plugins)
    with setting_guard(settings, "rules_file", "point {setting} at a valid routing rules file"):
        rules = load_rules(settings.rules_file)
    seeds = load_seeds()
    # A key file that cannot be read fails start-up here, before anything is served.
    with setting_guard(settings, "model_api_key_file", "point {setting} at a readable key file"):
        providers_configured = provider_configs(settings)
    tracer = trace.get_tracer("toolmesh.router", tracer_provider=tracer_provider)

    production = settings.env is Environment.PRODUCTION
    hosts = HostPolicy.parse(settings.backend_allowed_hosts)
    commands = CommandPolicy.parse(settings.backend_stdio_commands, open_when_empty=not production)
    secret_dirs = [
        Path(os.path.realpath(d.strip()))
        for d in settings.backend_secret_dirs.split(",")
        if d.strip()
    ]

    async def register(server: aio.Server) -> Registered:
        url = settings.database_url or sqlite_url(settings.ensure_data_dir(), "router")
        # At head, or migrated to it under the schema lock, or refused with what to run.
        await check_schema(url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
        engine = create_engine(url)
        cleanups.append(engine.dispose)
        channel = open_channel(settings.telemetry_target)
        cleanups.append(channel.close)
        health = ToolHealth(
            channel, refresh_s=settings.health_refresh_s, window_s=settings.health_window_s
        )
        health.start()
        cleanups.append(health.stop)
        audit = RouterAudit(settings.resolved_audit_outbox_file(), settings.telemetry_target)
        await audit.open()
        cleanups.append(audit.close)
        manager = BackendManager(
            BackendStore(session_factory(engine)),
            ManagerSettings(
                sync_s=settings.backend_sync_s,
                discovery_s=settings.backend_discovery_s,
                timeout_ms=settings.backend_timeout_ms,
                max_concurrency=settings.backend_max_concurrency,
                backoff_min_s=settings.backend_backoff_min_s,
                backoff_max_s=settings.backend_backoff_max_s,
                stderr_lines_per_s=settings.backend_stderr_lines_per_s,
            ),
            hosts=hosts,
            commands=commands,
            audit=audit,
            clock=clock,
        )
        # Cleanups run in reverse: backends stop (children exit) before the audit outbox closes.
        cleanups.append(manager.stop)
        await manager.start()
        router = ToolRouter(rules, tools, health, backends=manager.served, notice=manager.note_rule)
        for name in router.waiting:
            manager.note_rule(name, "no backend serves it yet; the rule applies once one does")
        pool = RoutePool(router)
        cleanups.append(pool.close)
        prompts = PromptStore(session_factory(engine), cache_s=settings.prompt_cache_s)
        await prompts.seed(seeds)
        model = None
        if providers_configured:
            providers = build_providers(
                providers_configured,
                settings.breaker_config(),
                tracer,
                max_attempts=settings.model_max_attempts,
            )
            cleanups.append(providers.close)
            model = ModelRouter(
                providers,
                prompts,
                model_settings(settings),
                weights=rules.weights,
                threshold=rules.threshold,
                health=health,
                clock=time.monotonic,
            )
        # `toolmesh up` and operators read which mode the router runs in from here (and from
        # GetServiceInfo's attributes).
        log.info("routing mode", extra=routing_mode(model))
        servicer = RouterServicer(
            registry=tools,
            router=pool,
            executor=Executor(
                max_result_bytes=settings.max_result_bytes,
                tracer=tracer,
                breakers=BreakerRegistry(settings.breaker_config()),
                concurrency_wait_s=settings.concurrency_wait_ms / 1000,
            ),
            notes=NotesStore(session_factory(engine)),
            backends=BackendAdmin(
                manager,
                secret_dirs=secret_dirs if secret_dirs or not production else None,
                register_wait_s=settings.backend_register_wait_s,
                contract=contract_message,
            ),
            prompts=PromptAdmin(prompts),
            model=model,
            clock=clock,
        )
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register
