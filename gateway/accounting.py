"""Cost and governance for the gateway's Run: prices, budget checks, usage and audit records.

- :class:`PriceCache` keeps telemetry's price table (GetPrices) fresh in the background, so every
  RunResponse is priced locally with ``services.kit.pricing.cost_micros`` (the same function
  telemetry prices usage with at ingest). Until the first table arrives, Runs are priced at zero
  with price version ``unpriced``.
- :class:`BudgetCache` remembers per (tenant, principal) whether any budget applies, so callers
  without a budget never pay a hop: a caller not known yet reserves (telemetry answers
  ``unlimited`` when no budget applies), a caller known to be unbudgeted is re-checked with
  GetBudgetState in the background once its entry is older than ``budget_state_ttl_s``.
- :class:`BudgetLeases` holds, per budgeted (tenant, principal), a lease: one telemetry
  reservation of ``budget_lease_calls`` tool calls (and their estimated cost) that requests
  draw from locally, so a budgeted caller pays one ReserveBudget hop per lease, not per
  request (see the class for the bound on overspend).
- :class:`AuditLimiter` caps ``auth.failure`` events per gateway replica (a token bucket), so a
  client spraying bad tokens cannot flood the outbox and the audit chain.
- ``usage_record`` builds the compact per-request record that travels through the durable
  outbox (kind ``usage``; gateway.outbox delivers it); audit events are built by the kit's one
  builder (services.kit.audit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.authn import AuthSnapshot
from gateway.reliability import Guard
from gateway.settings import GatewaySettings
from services.kit.metrics import meter
from services.kit.pricing import ModelPrice, PriceTable, cost_micros
from services.kit.tokens import TokenRules, signed_identity
from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger("toolmesh.gateway.accounting")

TELEMETRY = "telemetry"
# Resource service.name of the gateway: its records are the ones statistics are made of.
SERVICE = "toolmesh-gateway"
# Answers that mean the mesh failed (not the caller): they count against availability.
MESH_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)
UNPRICED = "unpriced"
UNKNOWN_TENANT = "_unknown"
GATEWAY_CONTRACTS = ("toolmesh.gateway.v1",)
# Bound on the (tenant, principal) entries the budget cache keeps; the oldest go first.
MAX_BUDGET_ENTRIES = 100_000
# Issuer and audience play no part in a signature-only check; the size cap is the kit's.
_IDENTITY_RULES = TokenRules(issuer="-", audience="-")

_AUDIT_DROPPED = meter().create_counter(
    "toolmesh.gateway.audit.dropped",
    description="auth.failure audit events not recorded because of the per-replica rate limit.",
)
_RESERVATIONS = meter().create_counter(
    "toolmesh.gateway.budget.reservations",
    description="Budget reservations asked by the gateway, by result.",
)


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass(frozen=True)
class Price:
    cost_micros: int
    currency: str
    version: str


class PriceCache:
    """telemetry.GetPrices, refreshed every ``prices_refresh_s`` in the background."""

    def __init__(self, stub: telemetry_pb2_grpc.TelemetryStub, settings: GatewaySettings):
        self._stub = stub
        self._settings = settings
        self.table: PriceTable | None = None

    def price(
        self, tokens_in: int, tokens_out: int, tool_calls: int, cost_units: int, model: str = ""
    ) -> Price:
        table = self.table
        if table is None:
            return Price(0, "", UNPRICED)
        return Price(
            cost_micros(table, tokens_in, tokens_out, tool_calls, cost_units, model=model),
            table.currency,
            table.version,
        )

    def estimate(self, tokens_in: int, tokens_out: int, cost_units: int, models: list[str]) -> int:
        """The most a request may cost: one tool call, and its tokens at the dearest of the
        models that may serve them (0 until the table arrives)."""
        table = self.table
        if table is None:
            return 0
        return max(
            cost_micros(table, tokens_in, tokens_out, 1, cost_units, model=model)
            for model in models or [""]
        )

    async def refresh(self, guard: Guard) -> None:
        reply = await guard.call(
            TELEMETRY,
            self._stub.GetPrices,
            telemetry_pb2.GetPricesRequest(),
            self._settings.outbox_call_timeout_s,
        )
        table = PriceTable(
            version=reply.version,
            currency=reply.currency,
            input_per_1k_tokens_micros=reply.input_per_1k_tokens_micros,
            output_per_1k_tokens_micros=reply.output_per_1k_tokens_micros,
            per_tool_call_micros=reply.per_tool_call_micros,
            per_cost_unit_micros=reply.per_cost_unit_micros,
            models={
                m.model: ModelPrice(m.input_per_1k_tokens_micros, m.output_per_1k_tokens_micros)
                for m in reply.models
            },
        )
        if not table.version:
            raise ValueError("telemetry served a price table without a version")
        if self.table is None or self.table.version != table.version:
            log.info("price table loaded", extra={"price_version": table.version})
        self.table = table

    async def run(self, guard: Guard) -> None:
        """Refresh forever; a failure keeps the last table and retries on the next tick."""
        failing = False
        while True:
            try:
                await self.refresh(guard)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("price refresh failed", extra={"error": str(exc)})
                failing = True
            await asyncio.sleep(self._settings.prices_refresh_s)


@dataclass
class _BudgetEntry:
    budgeted: bool
    checked_at: float


class BudgetCache:
    """Whether a budget applies to (tenant, principal), as last learned from telemetry."""

    def __init__(
        self,
        stub: telemetry_pb2_grpc.TelemetryStub,
        guard: Guard,
        settings: GatewaySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = stub
        self._guard = guard
        self._settings = settings
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _BudgetEntry] = OrderedDict()
        self._refreshing: dict[tuple[str, str], asyncio.Task[None]] = {}

    def known(self, caller: common_pb2.Caller) -> bool | None:
        """True/False as last learned, None when never learned (then reserve to find out)."""
        key = (caller.tenant, caller.subject)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (
            not entry.budgeted
            and self._clock() - entry.checked_at > self._settings.budget_state_ttl_s
            and key not in self._refreshing
        ):
            # Stale "no budget": keep using it, re-check in the background (never a hop here).
            task = asyncio.create_task(self._refresh(key, caller), name="budget-state")
            self._refreshing[key] = task
            task.add_done_callback(lambda _t: self._refreshing.pop(key, None))
        return entry.budgeted

    def learn(self, caller: common_pb2.Caller, budgeted: bool) -> None:
        key = (caller.tenant, caller.subject)
        self._entries[key] = _BudgetEntry(budgeted, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_BUDGET_ENTRIES:
            self._entries.popitem(last=False)

    async def _refresh(self, key: tuple[str, str], caller: common_pb2.Caller) -> None:
        try:
            reply = await self._guard.call(
                TELEMETRY,
                self._stub.GetBudgetState,
                telemetry_pb2.GetBudgetStateRequest(caller=caller),
                self._settings.outbox_call_timeout_s,
            )
        except Exception as exc:
            # Keep the last answer and ask again after another TTL.
            log.info("budget state refresh failed", extra={"error": str(exc)})
            entry = self._entries.get(key)
            if entry is not None:
                entry.checked_at = self._clock()
            return
        self.learn(caller, reply.budgeted)

    async def close(self) -> None:
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class AuditLimiter:
    """A token bucket: at most ``rate`` events a second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        _AUDIT_DROPPED.add(1, {"action": "auth.failure"})
        return False


def count_reservation(result: str) -> None:
    _RESERVATIONS.add(1, {"result": result})


def usage_record(
    *,
    request_id: str,
    route: str,
    caller: common_pb2.Caller,
    tool_name: str,
    tool_version: str,
    usage: common_pb2.Usage,
    outcome: str,
    reservation_id: str,
    status: grpc.StatusCode,
    duration_ms: float,
    tool_outcome: telemetry_pb2.ToolOutcome,
    tool_duration_ms: float,
    trace_id: str,
    prompts: list[str] | None = None,
    rules_version: str = "",
) -> telemetry_pb2.UsageRecord:
    """The one compact record of a request: what it used (priced and charged against budgets
    by telemetry) and how it went (statistics, SLOs and tool health are computed from these
    records, so they stay exact whatever share of spans is kept)."""
    return telemetry_pb2.UsageRecord(
        request_id=request_id,
        tenant=caller.tenant,
        principal=caller.subject,
        route=route,
        tool_name=tool_name,
        tool_version=tool_version,
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        tool_calls=usage.tool_calls,
        cost_units=usage.cost_units,
        occurred_at=now_timestamp(),
        outcome=outcome,
        reservation_id=reservation_id,
        service=SERVICE,
        duration_ms=duration_ms,
        grpc_status_code=status.value[0],
        error=status in MESH_FAULTS,
        tool_outcome=tool_outcome,
        tool_duration_ms=tool_duration_ms,
        trace_id=trace_id,
        model=usage.model,
        prompts=prompts or [],
        rules_version=rules_version,
    )


def verified_identity(
    token: str, snapshot: AuthSnapshot | None, rules: TokenRules | None = None
) -> tuple[str, str, str]:
    """(tenant, subject, token id) of a refused token whose signature verifies with a known
    key (say, expired or revoked), else ("_unknown", "", ""): claims of a token whose
    signature does not verify are the sender's word and are never recorded as fact.

    The signature-only path of services.kit.tokens, so the form, size and header rules are
    the verifier's own; ``rules`` only matter for the size cap (the kit's by default)."""
    if snapshot is None:
        return UNKNOWN_TENANT, "", ""
    identity = signed_identity(token, snapshot.keys, rules or _IDENTITY_RULES)
    if identity is None:
        return UNKNOWN_TENANT, "", ""
    return identity.tenant or UNKNOWN_TENANT, identity.subject, identity.token_id


@dataclass
class _Lease:
    reservation_id: str
    calls: int
    cost_micros: int
    # Drawn from until then (on this gateway's monotonic clock), well before telemetry
    # releases the reservation.
    usable_until: float


@dataclass
class BudgetLeases:
    """Budget leases: one telemetry reservation of ``size`` tool calls per budgeted caller,
    drawn from by its requests here, one call (and its estimated cost) each.

    A lease is checked against the caller's budgets like any reservation, so leases never
    together pass a limit; a caller whose budget cannot hold a whole lease is not leased to
    (for ``budget_state_ttl_s``) and reserves per request as before. Every request but the
    lease's last sends its usage record without a reservation id; the last one's commits
    the lease (telemetry deletes the reservation when it records it). Until then the lease is
    counted in full besides the records already delivered, so a budget is, if anything,
    refused early. The bound on overspend: once the last record committed the lease, up to
    ``size - 1`` records of the lease not yet delivered (an outbox delivering late) are in
    neither the reservation nor the ledger, so a caller can pass a limit by at most
    ``size - 1`` tool calls per lease, per gateway replica. A lease not used up (a quiet
    caller, a gateway killed) holds its calls until telemetry releases it after
    ``budget_reservation_ttl_s``. ``size`` 1 turns leasing off."""

    size: int
    lifetime_s: float
    retry_after_s: float
    clock: Callable[[], float] = time.monotonic
    _leases: dict[tuple[str, str], _Lease] = field(default_factory=dict)
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # Callers whose budget refused a whole lease, until when.
    _tight: dict[tuple[str, str], float] = field(default_factory=dict)

    async def draw(
        self,
        caller: common_pb2.Caller,
        cost_micros: int,
        acquire: Callable[[int, int], Awaitable[str | None]],
    ) -> tuple[bool, str]:
        """(True, reservation id to commit, "" but for a lease's last call) when the call was
        drawn from a lease, leasing one first if needed through ``acquire(calls, cost)``
        (None: no lease granted); (False, "") when the request must reserve by itself."""
        key = (caller.tenant, caller.subject)
        if self.size <= 1 or self._tight.get(key, float("-inf")) > self.clock():
            return False, ""
        taken = self._take(key, cost_micros)
        if taken is not None:
            return True, taken
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            # Another request may have leased while this one waited.
            taken = self._take(key, cost_micros)
            if taken is not None:
                return True, taken
            reservation_id = await acquire(self.size, self.size * cost_micros)
            if reservation_id is None:
                self._tight[key] = self.clock() + self.retry_after_s
                return False, ""
            self._leases[key] = _Lease(
                reservation_id,
                self.size,
                self.size * cost_micros,
                self.clock() + self.lifetime_s,
            )
            taken = self._take(key, cost_micros)
        return (True, taken) if taken is not None else (False, "")

    def _take(self, key: tuple[str, str], cost_micros: int) -> str | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        if lease.usable_until <= self.clock() or lease.cost_micros < cost_micros:
            # Expiring, or too little cost left for this call: left to telemetry to release.
            del self._leases[key]
            return None
        lease.calls -= 1
        lease.cost_micros -= cost_micros
        if lease.calls > 0:
            return ""
        del self._leases[key]
        return lease.reservation_id


@dataclass
class Accounting:
    """What the servicer needs for cost and governance, built and started by gateway.app."""

    prices: PriceCache
    budgets: BudgetCache
    auth_failures: AuditLimiter
    leases: BudgetLeases

    @classmethod
    def create(
        cls,
        stub: telemetry_pb2_grpc.TelemetryStub,
        guard: Guard,
        settings: GatewaySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> Accounting:
        rate = settings.audit_auth_failures_per_s
        return cls(
            prices=PriceCache(stub, settings),
            budgets=BudgetCache(stub, guard, settings, clock=clock),
            auth_failures=AuditLimiter(rate, max(1, int(rate)), clock),
            leases=BudgetLeases(
                size=settings.budget_lease_calls,
                # Half the reservation's life: the last call's record commits it in time.
                lifetime_s=settings.budget_reservation_ttl_s / 2,
                retry_after_s=settings.budget_state_ttl_s,
                clock=clock,
            ),
        )
