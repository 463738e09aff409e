"""Wiring: rules, registry, notes database, tool health and the servicer, for the kit's server."""

from __future__ import annotations

from grpc import aio
from opentelemetry import trace

from services.kit.breaker import BreakerRegistry
from services.kit.channels import open_channel
from services.kit.db import create_engine, session_factory, sqlite_url
from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, GATEWAY, PeerRules
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import ServiceSettings
from services.kit.startup import setting_guard
from services.router.catalog import default_registry
from services.router.health import ToolHealth
from services.router.invoke import Executor
from services.router.migrations import MIGRATIONS
from services.router.notes import NotesStore
from services.router.registry import Registry
from services.router.routing import ToolRouter
from services.router.rules import load_rules
from services.router.servicer import RouterServicer
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
    },
)


def build(
    settings: ServiceSettings,
    cleanups: list[Cleanup],
    *,
    registry: Registry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Register:
    """Load and check rules and contracts now (a bad file fails start-up), serve later.

    Test hook: ``registry`` replaces the published tools (for example to add a slow tool) and
    ``tracer_provider`` receives the tool spans instead of the global provider.
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
    tracer = trace.get_tracer("toolmesh.router", tracer_provider=tracer_provider)

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
        servicer = RouterServicer(
            registry=tools,
            router=ToolRouter(rules, tools, health),
            executor=Executor(
                max_result_bytes=settings.max_result_bytes,
                tracer=tracer,
                breakers=BreakerRegistry(settings.breaker_config()),
            ),
            notes=NotesStore(session_factory(engine)),
        )
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register
