"""Wiring: rules, registry, notes database, tool health, tool backends and the servicer, for the
kit's server."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from grpc import aio
from opentelemetry import trace

from services.kit.breaker import BreakerRegistry
from services.kit.channels import open_channel
from services.kit.db import create_engine, session_factory
from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, GATEWAY, PeerRules
from services.kit.periodic import every
from services.kit.reloadable import Reloadable, watch
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
from services.router.releases.admin import ReleaseAdmin
from services.router.releases.analyzer import Analyzer
from services.router.releases.model import ROUTING_UNIT, Release, UnitKey, UnitKind
from services.router.releases.shadow import ShadowRunner
from services.router.releases.store import ReleaseStore
from services.router.releases.view import ReleaseView
from services.router.routing import RoutePool, ToolRouter
from services.router.rules import RuleBook, Rules, RulesError, load_rule_book, rules_sources
from services.router.served import Served
from services.router.servicer import RouterServicer, contract_message, routing_mode
from services.router.settings import RouterSettings
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2_grpc

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
        "StartRelease": [GATEWAY],
        "GetRelease": [GATEWAY],
        "ListReleases": [GATEWAY],
        "ControlRelease": [GATEWAY],
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


def replica_id() -> str:
    """This process's name in release leases and shadow tallies: host, pid and a nonce (a
    restarted process is a new replica, so it never mistakes a lease for its own)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def build(
    settings: ServiceSettings,
    cleanups: list[Cleanup],
    *,
    registry: Registry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    release_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Register:
    """Load and check rules and contracts now (a bad file fails start-up), serve later.

    Test hooks: ``registry`` replaces the published tools (for example to add a slow tool),
    ``tracer_provider`` receives the tool spans instead of the global provider, ``clock``
    is the wall clock the tools read (fixed, for exact answers), and ``release_clock`` the
    one releases are timed by.
    """
    if not isinstance(settings, RouterSettings):
        raise TypeError("the router needs RouterSettings")
    plugins = [m.strip() for m in settings.plugin_modules.split(",") if m.strip()]
    with setting_guard(
        settings, "plugin_modules", "list importable modules that define TOOLS in {setting}"
    ):
        tools = registry if registry is not None else default_registry(plugins)
    rule_files = _rule_files(settings)
    book = rule_files.current
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
        url = settings.resolved_database_url()
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
        audit = RouterAudit(
            url, settings.telemetry_target, legacy_file=settings.resolved_audit_outbox_file()
        )
        cleanups.append(audit.close)
        await audit.open()
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
        routers = _routers(book, tools, health, manager)
        pool = RoutePool(routers[book.seed])
        cleanups.append(pool.close)
        view = await _release_view(
            settings,
            ReleaseStore(session_factory(engine)),
            tools=tools,
            manager=manager,
            book=book,
            clock=release_clock,
        )
        cleanups.append(view.stop)
        prompts = PromptStore(session_factory(engine), cache_s=settings.prompt_cache_s)
        await prompts.seed(seeds)
        model = _model_router(
            settings,
            configured=providers_configured,
            prompts=prompts,
            rules=book.versions[book.seed],
            health=health,
            tracer=tracer,
            cleanups=cleanups,
        )
        # `toolmesh up` and operators read which mode the router runs in from here (and from
        # GetServiceInfo's attributes).
        log.info("routing mode", extra=routing_mode(model))
        executor = Executor(
            max_result_bytes=settings.max_result_bytes,
            tracer=tracer,
            breakers=BreakerRegistry(settings.breaker_config()),
            concurrency_wait_s=settings.concurrency_wait_ms / 1000,
        )
        notes = NotesStore(session_factory(engine))
        served = Served(tools, manager, view, routers, book)
        cleanups.append(_watch_rules(settings, rule_files, served, health))
        shadow = ShadowRunner(
            executor, view, pool, tracer, max_inflight=settings.release_shadow_inflight
        )
        cleanups.append(shadow.stop)
        release_admin = _release_admin(
            settings,
            view=view,
            served=served,
            prompts=prompts,
            executor=executor,
            notes=notes,
            audit=audit,
            channel=channel,
            cleanups=cleanups,
            clock=release_clock,
        )
        servicer = RouterServicer(
            registry=tools,
            router=pool,
            executor=executor,
            notes=notes,
            backends=BackendAdmin(
                manager,
                secret_dirs=secret_dirs if secret_dirs or not production else None,
                register_wait_s=settings.backend_register_wait_s,
                contract=contract_message,
            ),
            prompts=PromptAdmin(prompts, release_admin.releasing_prompt),
            served=served,
            releases=release_admin,
            shadow=shadow,
            model=model,
            clock=clock,
            rule_files=rule_files,
        )
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register


def _routers(
    book: RuleBook, tools: Registry, health: ToolHealth, manager: BackendManager
) -> dict[str, ToolRouter]:
    """A scorer per routing rules version (each checked against the registry)."""
    routers = {
        version: ToolRouter(rules, tools, health, backends=manager.served, notice=manager.note_rule)
        for version, rules in book.versions.items()
    }
    for name in routers[book.seed].waiting:
        manager.note_rule(name, "no backend serves it yet; the rule applies once one does")
    return routers


def _rule_files(settings: RouterSettings) -> Reloadable[RuleBook]:
    """The seed file and rules_dir, loaded and checked now (a bad file fails start-up)."""
    with setting_guard(
        settings,
        "rules_dir" if settings.rules_dir else "rules_file",
        "point {setting} at valid routing rules (one version per file)",
    ):
        return Reloadable(
            "routing_rules",
            lambda: rules_sources(settings.rules_file, settings.rules_dir),
            lambda: load_rule_book(settings.rules_file, settings.rules_dir),
            lambda loaded: loaded.seed,
        )


def _watch_rules(
    settings: RouterSettings, rule_files: Reloadable[RuleBook], served: Served, health: ToolHealth
) -> Cleanup:
    """Reload the rules files every config_reload_s (and on SIGHUP): new versions join the
    loaded ones (docs/releases.md, "Rules files mounted from a ConfigMap")."""
    rule_files.check = lambda _old, new: _check_new_versions(served, new)
    rule_files.applied = lambda new: _add_versions(served, new, health)
    return watch(settings.config_reload_s, rule_files)


def _check_new_versions(served: Served, book: RuleBook) -> None:
    """A reloaded rules book may add versions, never change one already loaded (a version
    names one content: releases, figures and every RouteResponse refer to it); each new
    version must route to registered tools (RulesError, a ValueError, otherwise)."""
    for version, rules in book.versions.items():
        loaded = served.routers.get(version)
        if loaded is None:
            rules.check_against(served.registry)
        elif loaded.rules.model_dump() != rules.model_dump():
            raise RulesError(
                f"routing rules version {version} changed but kept its version; a version "
                "never changes: give the new rules their own"
            )


def _add_versions(served: Served, book: RuleBook, health: ToolHealth) -> None:
    """Serve the new versions side by side with the loaded ones, ready for a release. A
    version no longer in the files stays loaded until the next restart: it may be stable, or
    in a release."""
    manager = served.backends
    added = []
    for version, rules in book.versions.items():
        if version not in served.routers:
            served.routers[version] = ToolRouter(
                rules, served.registry, health, backends=manager.served, notice=manager.note_rule
            )
            added.append(version)
    served.rules = RuleBook({v: r.rules for v, r in served.routers.items()}, book.seed)
    if added:
        log.info(
            "routing rules versions loaded; start a release to serve them",
            extra={"versions": added, "command": "toolmesh release start routing <version>"},
        )


async def _release_view(
    settings: RouterSettings,
    store: ReleaseStore,
    *,
    tools: Registry,
    manager: BackendManager,
    book: RuleBook,
    clock: Callable[[], datetime],
) -> ReleaseView:
    """The release state this replica serves from, read now and every release_sync_s; the
    backend tools are pinned to their stable versions from it."""
    view = ReleaseView(
        store,
        replica=replica_id(),
        sync_s=settings.release_sync_s,
        defaults=lambda: _defaults(tools, manager, book),
        clock=clock,
    )
    manager.stable_of = lambda tenant, name: view.stable(UnitKey(UnitKind.TOOL, tenant, name))
    view.on_change(manager.recompute)
    await view.start()
    return view


def _defaults(
    registry: Registry, manager: BackendManager, book: RuleBook
) -> Iterator[tuple[UnitKey, str]]:
    """Every unit and the version it starts from when first seen: the latest release of a
    built-in tool, the version a backend tool serves now, the seed rules file's version."""
    for name in sorted({tool.spec.name for tool in registry.all()}):
        latest = registry.latest(name)
        if latest is not None:
            yield UnitKey(UnitKind.TOOL, "", name), latest.spec.version
    yield ROUTING_UNIT, book.seed
    for runtime in manager.runtimes():
        for name, tool in runtime.tools.items():
            yield (
                UnitKey(UnitKind.TOOL, runtime.record.tenant, f"{runtime.name}.{name}"),
                (tool.spec.version),
            )


def _release_admin(
    settings: RouterSettings,
    *,
    view: ReleaseView,
    served: Served,
    prompts: PromptStore,
    executor: Executor,
    notes: NotesStore,
    audit: RouterAudit,
    channel: aio.Channel,
    cleanups: list[Cleanup],
    clock: Callable[[], datetime],
) -> ReleaseAdmin:
    """The release RPCs, and this replica's analyzer running every ``release_tick_s``."""
    manager = served.backends

    async def completed(release: Release) -> None:
        """A backend tool's version a completed release replaced is retired."""
        unit = release.unit
        if unit.kind is UnitKind.TOOL and "." in unit.name:
            await manager.retire(unit.tenant, unit.name, release.stable_version)

    analyzer = Analyzer(
        view.store,
        view,
        telemetry_pb2_grpc.TelemetryStub(channel),
        audit,
        owner=view.replica,
        lease_s=settings.release_lease_s,
        clock=clock,
        completed=completed,
    )
    cleanups.append(analyzer.stop)
    cleanups.append(
        every(
            settings.release_tick_s,
            analyzer.tick,
            name="release-analyzer",
            first_after_s=settings.release_tick_s,
        )
    )
    return ReleaseAdmin(
        view.store,
        view,
        served=served,
        prompts=prompts,
        executor=executor,
        notes=notes,
        audit=audit,
        clock=clock,
        completed=completed,
    )


def _model_router(
    settings: RouterSettings,
    *,
    configured: list[ProviderConfig],
    prompts: PromptStore,
    rules: Rules,
    health: ToolHealth,
    tracer: trace.Tracer,
    cleanups: list[Cleanup],
) -> ModelRouter | None:
    """The model behind the rules, when a provider is configured."""
    if not configured:
        return None
    providers = build_providers(
        configured, settings.breaker_config(), tracer, max_attempts=settings.model_max_attempts
    )
    cleanups.append(providers.close)
    return ModelRouter(
        providers,
        prompts,
        model_settings(settings),
        weights=rules.weights,
        threshold=rules.threshold,
        health=health,
        clock=time.monotonic,
    )
