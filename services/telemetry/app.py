"""Wiring: settings, database, stores, the audit signing key and checkpoint log, background
jobs, and the two services on one port (Telemetry and OTLP's TraceService) with their peer
rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, AUTH, GATEWAY, ROUTER, PeerRules, parse_aliases
from services.kit.periodic import background
from services.kit.pricing import PriceTable
from services.kit.reloadable import Reloadable, watch
from services.kit.server import Cleanup, Register, Registered, StartupRefused
from services.kit.settings import Environment, ServiceSettings
from services.kit.startup import setting_guard
from services.telemetry import slo
from services.telemetry.audit import AuditLog
from services.telemetry.auditing import AuditCheckpoints
from services.telemetry.checkpoints import (
    CheckpointLog,
    CheckpointSetupError,
    Keyring,
    create_dev_key,
)
from services.telemetry.database import Database
from services.telemetry.forward import Forwarder
from services.telemetry.housekeeping import Housekeeping
from services.telemetry.ingest import TraceService
from services.telemetry.ledger import Ledger
from services.telemetry.migrations import MIGRATIONS
from services.telemetry.records import RequestRecords
from services.telemetry.selfspans import LocalSpanExporter
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.settings import TelemetrySettings
from services.telemetry.store import SpanStore
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"].full_name
# Every RPC that carries a tenant, or reads one, is the gateway's alone (it authenticated the
# caller); auth and the router also append their own audit events (admin changes, tool drift).
# The router reads tool health, computed from records only the gateway writes. Spans come from
# every process of the mesh and the collector, which is why they never write tenant data or
# tool health (docs/security.md).
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "GetStats": [GATEWAY],
        "GetServiceInfo": [ANY_PEER],
        "GetTrace": [GATEWAY],
        "RecordUsage": [GATEWAY],
        "GetPrices": [GATEWAY],
        "GetCost": [GATEWAY],
        "SetBudget": [GATEWAY],
        "ListBudgets": [GATEWAY],
        "GetBudgetState": [GATEWAY],
        "ReserveBudget": [GATEWAY],
        "AppendAudit": [GATEWAY, AUTH, ROUTER],
        "ListAudit": [GATEWAY],
        "VerifyAudit": [GATEWAY],
        "GetSlo": [GATEWAY],
        "GetToolHealth": [ROUTER],
        "CheckpointAudit": [GATEWAY],
        # The router's release analyzer judges candidates on these figures.
        "GetReleaseFigures": [ROUTER],
    },
).merged(PeerRules.for_service(TraceService.SERVICE, {"Export": [ANY_PEER]}))


def audit_keyring(settings: TelemetrySettings) -> Keyring:
    """The signing key and the keys older checkpoints were signed with.

    Production signs only with a key the operator provides (never one generated next to the
    data it protects) and writes checkpoints only where the operator says; development creates
    a key in the data directory (0600) on first start.
    """
    prefix = "TOOLMESH_TELEMETRY_"
    if settings.env is Environment.PRODUCTION:
        if settings.audit_key_file is None:
            raise StartupRefused(
                f"telemetry: set {prefix}AUDIT_KEY_FILE to the Ed25519 key that signs audit "
                "checkpoints (openssl genpkey -algorithm ed25519 -out audit.pem; chmod 600 "
                "audit.pem), mounted from a secret, not stored beside the database"
            )
        if settings.audit_checkpoint_dir is None:
            raise StartupRefused(
                f"telemetry: set {prefix}AUDIT_CHECKPOINT_DIR to a directory on a volume that is "
                "not the database's (the signed checkpoint log), and ship its files off the host"
            )
    key_file = settings.resolved_audit_key_file()
    keyring_dir = settings.resolved_audit_keyring_dir()
    try:
        if settings.audit_key_file is None and not key_file.exists():
            create_dev_key(key_file, keyring_dir)
        return Keyring.load(key_file, keyring_dir)
    except CheckpointSetupError as error:
        raise StartupRefused(f"telemetry: {error} ({prefix}AUDIT_KEY_FILE)") from None
    except OSError as error:
        raise StartupRefused(
            f"telemetry: cannot create the development audit key {key_file}: {error.strerror}"
        ) from None


def _record_own_spans(store: SpanStore, keep_every_trace: bool, cleanups: list[Cleanup]) -> None:
    """Telemetry's spans go to its own store (see selfspans) when the SDK is installed."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        exporter = LocalSpanExporter(
            store, asyncio.get_running_loop(), keep_every_trace=keep_every_trace
        )
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=1000)
        provider.add_span_processor(processor)

        async def stop_recording() -> None:
            # The provider outlives this server (a process may build another one, as tests
            # do): its processor is shut down (worker thread ended, later spans dropped) on a
            # thread, since an export in flight waits for this event loop.
            await exporter.close()
            await asyncio.to_thread(processor.shutdown)

        cleanups.append(stop_recording)


def _same_version_same_content(what: str) -> Callable[[Any, Any], None]:
    """A version names one content: usage records and GetSlo answers keep the version, so a
    changed file under the version in use would make it mean two things."""

    def check(old: Any, new: Any) -> None:
        if new.version == old.version and new != old:
            raise ValueError(
                f"the {what} changed but still says version {new.version}; give the change a "
                "new version"
            )

    return check


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Check the configuration, then open the stores and start the background jobs inside the
    server's event loop."""
    if not isinstance(settings, TelemetrySettings):
        raise TypeError("telemetry needs TelemetrySettings")

    # Bad configuration fails start-up, before anything is served; once serving, a changed
    # file is reloaded (a bad one keeps the version in use).
    with setting_guard(settings, "prices_file", "point {setting} at a valid price table"):
        prices = Reloadable(
            "prices",
            lambda: [settings.prices_file],
            lambda: PriceTable.load(settings.prices_file),
            lambda table: table.version,
            check=_same_version_same_content("price table"),
        )
    with setting_guard(settings, "slo_file", "point {setting} at a valid SLO file"):
        slos = Reloadable(
            "slo",
            lambda: [settings.slo_file],
            lambda: slo.SloConfig.load(settings.slo_file),
            lambda config: config.version,
            check=_same_version_same_content("SLO file"),
        )
    keyring = audit_keyring(settings)
    keep_every_trace = settings.trace_keep_ratio >= 1.0

    async def register(server: aio.Server) -> Registered:
        checkpoint_log = CheckpointLog(
            settings.resolved_audit_checkpoint_dir(), settings.resolved_replica_id(), keyring
        )
        try:
            await checkpoint_log.open()
        except (CheckpointSetupError, OSError) as error:
            raise StartupRefused(f"telemetry: audit checkpoint log: {error}") from None
        url = settings.resolved_database_url()
        # At head, or migrated to it under the schema lock, or refused with what to run.
        await check_schema(url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
        database = Database(url, synchronous=settings.sqlite_synchronous)
        cleanups.append(database.close)
        store = SpanStore(database)
        _record_own_spans(store, keep_every_trace, cleanups)
        # Usage is priced with the table in use when it arrives and keeps that version: a
        # reload prices new usage only.
        ledger = Ledger(database, prices.current)
        prices.applied = lambda table: setattr(ledger, "prices", table)
        cleanups.append(watch(settings.config_reload_s, prices, slos))
        audit = AuditLog(database)
        checkpoints = AuditCheckpoints(audit, checkpoint_log, settings.audit_retention_days * 86400)
        forwarder = None
        if settings.forward_otlp_endpoint:
            forwarder = Forwarder(settings.forward_otlp_endpoint, settings.forward_queue_batches)
            cleanups.append(background(forwarder.run(), name="otlp-forward"))
        cleanups.extend(Housekeeping(settings, store, ledger, checkpoints).start())
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(
            TelemetryServicer(
                settings=settings,
                store=store,
                ledger=ledger,
                records=RequestRecords(database),
                audit=audit,
                checkpoints=checkpoints,
                slos=slos,
                configs=(prices, slos),
            ),
            server,
        )
        TraceService(
            store,
            forwarder,
            peers_authenticated=settings.tls_enabled and settings.tls_require_client_auth,
            aliases=parse_aliases(settings.peer_aliases),
            keep_every_trace=keep_every_trace,
        ).add_to_server(server)
        return Registered([SERVICE_NAME, TraceService.SERVICE], peers=PEER_RULES)

    return register
