"""The gateway's guards around its dependencies: breakers, bounded calls and bulkheads.

Every downstream call goes through ``Guard.call``: the dependency's circuit breaker decides
whether it may be tried at all, the call carries a timeout taken from the request's budget and
is also bounded on our side with ``asyncio.timeout`` (gRPC rounds timeouts on the wire), and
its outcome is reported back to the breaker. Whatever went wrong comes out as one exception,
``DependencyError``, which the caller turns into a fallback or a precise status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio
from opentelemetry.metrics import CallbackOptions, Observation

from gateway.clients import started_calls
from services.kit.breaker import BreakerConfig, BreakerOpen, BreakerRegistry, State
from services.kit.metrics import meter

log = logging.getLogger("toolmesh.gateway.reliability")

T = TypeVar("T")

# Asks a dependency itself whether it is back (its health check), outside its breaker.
Probe = Callable[[], Awaitable[bool]]
# At most one recovery probe per dependency this often, whoever asks.
PROBE_INTERVAL_S = 0.25
# How often a sender waiting for a half-open breaker's verdict tries again.
SETTLE_STEP_S = 0.05

# Outcomes that speak of the request, not of the dependency's health: never counted by a breaker.
NEUTRAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        # A dependency refusing excess load is healthy and protecting itself.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class DependencyError(Exception):
    """A downstream call failed, timed out on our side, or was not tried (breaker open)."""

    def __init__(
        self,
        dependency: str,
        code: grpc.StatusCode,
        reason: str,
        *,
        rpc_error: aio.AioRpcError | None = None,
        retry_after_s: float = 0.0,
        tried: bool = True,
    ) -> None:
        super().__init__(f"{dependency}: {code.name}: {reason}")
        self.dependency = dependency
        self.code = code
        self.reason = reason
        self.rpc_error = rpc_error
        self.retry_after_s = retry_after_s
        # False when the breaker refused the call: nothing reached the dependency.
        self.tried = tried

    @property
    def neutral(self) -> bool:
        return self.code in NEUTRAL_CODES


class Guard:
    """Breakers by dependency name ("auth", "router", "memory", "telemetry", "tool:<name>")."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic):
        self.breakers = BreakerRegistry(config, clock)
        self._clock = clock
        self._probes: dict[str, Probe] = {}
        self._probed_at: dict[str, float] = {}
        self._probing: dict[str, asyncio.Future[bool]] = {}

    def add_probe(self, dependency: str, probe: Probe) -> None:
        self._probes[dependency] = probe

    async def recovered(self, dependency: str) -> bool:
        """While ``dependency``'s breaker is open, ask the dependency itself whether it is back;
        if it is, the breaker lets trial calls through at once (True).

        The outbox relay asks when its delivery is refused by an open breaker: without it the
        turns waiting there would wait out the whole open time (``breaker_open_s``) after the
        dependency recovered. A probe that fails or hangs is never counted by the breaker."""
        probe = self._probes.get(dependency)
        breaker = self.breakers.get(dependency)
        if probe is None:
            return False
        running = self._probing.get(dependency)
        if running is not None and not running.done():
            # Concurrent senders share the probe in flight and its verdict.
            return await asyncio.shield(running) and breaker.half_open_early()
        if breaker.state is not State.OPEN:
            return False
        now = self._clock()
        if now - self._probed_at.get(dependency, -PROBE_INTERVAL_S) < PROBE_INTERVAL_S:
            return False
        self._probed_at[dependency] = now
        task = self._probing[dependency] = asyncio.ensure_future(probe())
        if not await asyncio.shield(task):
            return False
        return breaker.half_open_early()

    async def call(
        self,
        dependency: str,
        method: Callable[..., Any],
        request: Any,
        timeout_s: float,
    ) -> Any:
        """``method(request, timeout=timeout_s)`` under the dependency's breaker, bounded by
        ``timeout_s`` on our side too; raises DependencyError for every failure."""
        calls: list[Any] = []
        token = started_calls.set(calls)
        try:
            return await self.run(dependency, lambda: method(request, timeout=timeout_s), timeout_s)
        except BaseException:
            # A timeout or our caller going away must stop the downstream work: cancel the
            # real calls (cancelling the awaiting task does not reach them through client
            # interceptors, see gateway.clients).
            for call in calls:
                call.cancel()
            raise
        finally:
            started_calls.reset(token)

    async def call_recovering(
        self,
        dependency: str,
        method: Callable[..., Any],
        request: Any,
        timeout_s: float,
        settle_s: float = 0.5,
    ) -> Any:
        """``call`` for a sender that may wait a moment (the outbox relay). Refused by an open
        breaker, it asks the dependency whether it is back (``recovered``) and if so makes the
        call at once as a trial; refused because other callers' trial calls are in flight
        (half-open: the dependency is likely back), it waits up to ``settle_s`` for their
        verdict rather than a whole retry backoff."""
        waited = 0.0
        while True:
            try:
                return await self.call(dependency, method, request, timeout_s)
            except DependencyError as err:
                if err.tried:
                    raise
                if await self.recovered(dependency):
                    continue
                if self.breakers.get(dependency).state is not State.HALF_OPEN or waited >= settle_s:
                    raise
            await asyncio.sleep(SETTLE_STEP_S)
            waited += SETTLE_STEP_S

    async def run(self, dependency: str, start: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        breaker = self.breakers.get(dependency)
        try:
            permit = breaker.acquire()
        except BreakerOpen as exc:
            raise DependencyError(
                dependency,
                grpc.StatusCode.UNAVAILABLE,
                "circuit breaker open",
                retry_after_s=exc.retry_after_s,
                tried=False,
            ) from None
        started = self._clock()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the call completes, and a cancelled Run or relay must stop.
            async with asyncio.timeout(timeout_s):
                result = await start()
        except TimeoutError:
            breaker.record(False, self._clock() - started, permit)
            raise DependencyError(
                dependency, grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"
            ) from None
        except aio.AioRpcError as err:
            code = err.code()
            if code in NEUTRAL_CODES or code == grpc.StatusCode.CANCELLED:
                breaker.release(permit)
            else:
                breaker.record(False, self._clock() - started, permit)
            raise DependencyError(dependency, code, err.details() or "", rpc_error=err) from None
        except asyncio.CancelledError:
            # Our caller went away: says nothing about the dependency.
            breaker.release(permit)
            raise
        except Exception:
            # Garbage from the dependency (say, a JWKS without a usable key) is a failure.
            breaker.record(False, self._clock() - started, permit)
            raise
        breaker.record(True, self._clock() - started, permit)
        return result


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if one swallowed it."""
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        pending = [t for t in pending if not t.done()]
    await asyncio.gather(*tasks, return_exceptions=True)


# Waiters a compartment queues at least, however small its limit.
_MIN_QUEUE = 16


class Shed(Exception):
    """A bulkhead stayed full for as long as the call could wait."""


@dataclass
class _Compartment:
    inflight: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class Bulkhead:
    """Calls in flight per key against a limit.

    A call over the limit waits (first come, first served, at most ``max(limit, 16)`` waiters
    per key) for up to the wait it is given, then is refused: a short queue absorbs bursts of
    healthy load, while a key that stays full — one tenant flooding the gateway, one tool
    hanging — is refused instead of holding callers until their deadlines."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._keys: dict[str, _Compartment] = {}
        _BULKHEADS.add(self)

    @property
    def inflight(self) -> dict[str, int]:
        return {key: c.inflight for key, c in self._keys.items() if c.inflight}

    @contextlib.asynccontextmanager
    async def slot(self, key: str = "", wait_s: float = 0.0) -> AsyncIterator[None]:
        """Hold a slot of ``key`` for the block; raises Shed when none came within ``wait_s``."""
        await self._enter(key, wait_s)
        try:
            yield
        finally:
            self._leave(key)

    async def _enter(self, key: str, wait_s: float) -> None:
        compartment = self._keys.setdefault(key, _Compartment())
        if compartment.inflight < self.limit and not compartment.waiters:
            compartment.inflight += 1
            return
        if wait_s <= 0 or len(compartment.waiters) >= max(self.limit, _MIN_QUEUE):
            self._refuse(key)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        compartment.waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter  # resolved by _leave, which hands its slot over
        except TimeoutError:
            self._give_up(key, compartment, waiter)
        except asyncio.CancelledError:
            self._give_up(key, compartment, waiter, cancelled=True)
            raise

    def _give_up(
        self,
        key: str,
        compartment: _Compartment,
        waiter: asyncio.Future[None],
        *,
        cancelled: bool = False,
    ) -> None:
        if waiter.done() and not waiter.cancelled():
            # The slot was handed over just as the wait ended: pass it on, then refuse.
            self._leave(key)
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                compartment.waiters.remove(waiter)
        if not cancelled:
            self._refuse(key)

    def _refuse(self, key: str) -> NoReturn:
        _SHED.add(1, {"bulkhead": self.name})
        compartment = self._keys.get(key)
        if compartment is not None and not compartment.inflight and not compartment.waiters:
            del self._keys[key]
        raise Shed(self.name)

    def _leave(self, key: str) -> None:
        compartment = self._keys[key]
        while compartment.waiters:
            waiter = compartment.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the oldest waiter
                return
        compartment.inflight -= 1
        if not compartment.inflight:
            del self._keys[key]


_BULKHEADS: weakref.WeakSet[Bulkhead] = weakref.WeakSet()


def _observe_inflight(_options: CallbackOptions) -> list[Observation]:
    observations = []
    for bulkhead in list(_BULKHEADS):
        if not bulkhead.inflight:
            observations.append(Observation(0, {"bulkhead": bulkhead.name}))
        for key, count in bulkhead.inflight.items():
            attributes = {"bulkhead": bulkhead.name}
            if key:
                attributes["key"] = key
            observations.append(Observation(count, attributes))
    return observations


_SHED = meter().create_counter(
    "toolmesh.gateway.shed", description="Calls refused at once because a bulkhead was full."
)
FALLBACKS = meter().create_counter(
    "toolmesh.gateway.fallbacks",
    description="Runs answered in a degraded way, by the dependency that failed.",
)
meter().create_observable_gauge(
    "toolmesh.gateway.inflight",
    callbacks=[_observe_inflight],
    description="Calls in flight per bulkhead (runs; tool calls keyed by tool).",
)
