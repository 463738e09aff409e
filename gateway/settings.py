"""Gateway settings; each target may be host:port, ``ipv4:a:p1,b:p2`` or ``dns:///name:port``."""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from services.kit.durability import Synchronous
from services.kit.settings import DEFAULT_PORTS, ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: ClassVar[str] = "gateway"
    inner: ClassVar[bool] = False

    port: int = Field(default=DEFAULT_PORTS["gateway"], ge=0, le=65535)
    auth_target: str = f"127.0.0.1:{DEFAULT_PORTS['auth']}"
    router_target: str = f"127.0.0.1:{DEFAULT_PORTS['router']}"
    memory_target: str = f"127.0.0.1:{DEFAULT_PORTS['memory']}"
    telemetry_target: str = f"127.0.0.1:{DEFAULT_PORTS['telemetry']}"

    # A request's budget: the caller's deadline (or the default), never more than the maximum.
    default_deadline_s: float = Field(default=10.0, gt=0)
    max_deadline_s: float = Field(default=30.0, gt=0)
    # Kept back from every downstream timeout so the gateway still has time to answer.
    deadline_reserve_ms: int = Field(default=50, ge=0)
    # The direct memory.AppendTurns (and an idempotency claim) gets at most this long; past it
    # the turn goes to the outbox (the claim: UNAVAILABLE).
    memory_write_timeout_ms: int = Field(default=250, ge=1)
    # Route gets at most this long (within the request's deadline); past it: router fallback.
    route_timeout_ms: int = Field(default=2000, ge=1)
    # A Route that consults the model (the rules found no tool) gets at most this long; the
    # router keeps within it and answers with the rules' decision when the model is too slow.
    model_route_timeout_ms: int = Field(default=30_000, ge=1)
    # Most recent turns of the session read from memory as the model's context (0: none), and
    # how long that read may take (past it the model gets no history: "memory" degraded).
    model_history_turns: int = Field(default=20, ge=0, le=1000)
    memory_read_timeout_ms: int = Field(default=250, ge=1)
    # A claimed idempotency key holds for the request's deadline plus this long, so that a
    # retry does not run it again while its answer waits in the outbox for memory.
    idempotency_lease_grace_s: float = Field(default=30.0, ge=0, le=300)

    # How often JWKS, revocations and policy are refreshed from auth.
    auth_refresh_s: float = Field(default=5.0, gt=0)
    # Without a successful refresh for this long, requests fail closed with UNAVAILABLE.
    auth_staleness_s: float = Field(default=60.0, gt=0)
    issuer: str = "toolmesh-auth"
    audience: str = "toolmesh"
    max_token_bytes: int = Field(default=8192, ge=256)
    max_token_lifetime_s: int = Field(default=3600, gt=0)
    leeway_s: int = Field(default=30, ge=0, le=30)

    # Bulkheads: requests in flight in the gateway, per tenant (so one tenant cannot starve the
    # others) and tool calls per tool. A request over a limit waits up to admission_wait_ms
    # (never more than half of what is left of its deadline) for a slot, first come first
    # served, then is refused with RESOURCE_EXHAUSTED and a RetryInfo of shed_retry_after_ms.
    max_inflight_runs: int = Field(default=128, ge=1)
    max_inflight_per_tenant: int = Field(default=64, ge=1)
    max_inflight_per_tool: int = Field(default=32, ge=1)
    admission_wait_ms: int = Field(default=250, ge=0)
    shed_retry_after_ms: int = Field(default=200, ge=0)

    # One circuit breaker per dependency (auth, router, memory, telemetry) and per tool.
    breaker_window: int = Field(default=20, ge=1)
    breaker_minimum_calls: int = Field(default=10, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_slow_call_rate: float = Field(default=0.8, gt=0, le=1)
    breaker_slow_call_s: float = Field(default=2.0, gt=0)
    breaker_open_s: float = Field(default=5.0, gt=0)
    breaker_half_open_calls: int = Field(default=3, ge=1)

    # Where the durable outbox keeps acknowledged items until memory and telemetry have them:
    # empty means the local SQLite file <data_dir>/gateway-outbox.db (dev: it dies with the
    # pod's emptyDir); a database URL means the gateway_outbox table there (production: its own
    # PostgreSQL database, so a pod scaled down mid-outage leaves its items to the next replica).
    outbox_url: str = ""
    # SQLite only: PRAGMA synchronous of the outbox (its file, or outbox_url's SQLite).
    # FULL: a committed write survives power loss (today's guarantee). NORMAL (WAL): it
    # survives kill -9 of the process but not a power loss or OS crash, and saves an fsync
    # per commit (docs/reliability.md).
    outbox_sqlite_synchronous: Synchronous = "FULL"
    # A claimed item is left to this replica for this long before another may claim it.
    outbox_lease_s: float = Field(default=60.0, gt=0)
    # Relay: idle poll and retry backoff.
    outbox_idle_s: float = Field(default=0.5, gt=0)
    # Relay under load: wait this long between deliveries that filled no batch, so each claim,
    # send and delete carries the items of a window (usage and audit reach telemetry up to
    # this much later); 0 delivers again at once.
    outbox_batch_window_s: float = Field(default=0.1, ge=0)
    outbox_backoff_base_s: float = Field(default=0.2, gt=0)
    # Capped low so replay starts within a second or two of a dependency's recovery.
    outbox_backoff_max_s: float = Field(default=1.0, gt=0)
    # Per delivery call made by the relay.
    outbox_call_timeout_s: float = Field(default=2.0, gt=0)

    # Cost and governance (gateway.accounting). Telemetry's price table is refreshed this often;
    # until it first arrives Runs are priced 0 with price_version "unpriced".
    prices_refresh_s: float = Field(default=5.0, gt=0)
    # How long "no budget applies to (tenant, principal)" is trusted before a background
    # re-check (GetBudgetState); a caller with a budget reserves on every Run that runs a tool.
    budget_state_ttl_s: float = Field(default=5.0, gt=0)
    # Cap on the ReserveBudget call (within the request's remaining deadline); reservations of
    # one tenant are serialized by telemetry, so a burst of them queues there.
    budget_call_timeout_ms: int = Field(default=2000, ge=1)
    # A reservation never committed by a usage record is released by telemetry after this.
    budget_reservation_ttl_s: int = Field(default=60, ge=1, le=3600)
    # Tool calls a budgeted caller leases from telemetry at once and draws from locally (one
    # ReserveBudget hop per lease instead of per request); a limit may be passed by up to this
    # many calls less one per gateway replica (gateway.accounting.BudgetLeases). 1: no leases.
    budget_lease_calls: int = Field(default=16, ge=1, le=1000)
    # Ledger unreachable while a budget applies (or may apply): refuse with UNAVAILABLE (false,
    # the default) or run the tool unchecked and report "budget" in degraded (true).
    budget_fail_open: bool = False
    # auth.failure audit events per second per gateway replica (token bucket, burst the same);
    # beyond it they are counted in toolmesh.gateway.audit.dropped and not recorded.
    audit_auth_failures_per_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _staleness_outlasts_refresh(self) -> Self:
        """A bound shorter than the refresh interval would fail closed between two refreshes."""
        if self.auth_staleness_s <= self.auth_refresh_s:
            raise ValueError("auth_staleness_s must be longer than auth_refresh_s")
        return self
