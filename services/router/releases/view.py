"""Each replica's copy of what to serve: every unit's stable version and every release in
progress, re-read from the database every ``sync_s`` seconds (and at once after a change this
replica made). So a step, a rollback or a promotion decided by any replica's analyzer is
applied by every replica within ``sync_s`` plus one read (the bound docs/releases.md states).

Lookups are plain dictionary reads, safe from the routing threads and cheap on the request
path. The view also keeps this replica's shadow tallies and adds them to the database at each
refresh (the analyzer sums every replica's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.metrics import meter
from services.router.releases.model import (
    ACTIVE,
    Release,
    ShadowTally,
    State,
    UnitKey,
    on_candidate,
)
from services.router.releases.store import ReleaseStore, Unit

log = logging.getLogger("toolmesh.router.releases")

STABLE = "stable"
CANDIDATE = "candidate"
# Units that must have a stable version, with the version they start from (bootstrap).
Defaults = Callable[[], Iterable[tuple[UnitKey, str]]]
Listener = Callable[[], None]

_VIEWS: list[ReleaseView] = []


class ReleaseView:
    def __init__(
        self,
        store: ReleaseStore,
        *,
        replica: str,
        sync_s: float,
        defaults: Defaults,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.replica = replica
        self._sync_s = sync_s
        self._defaults = defaults
        self._clock = clock
        self._units: dict[UnitKey, Unit] = {}
        self._active: dict[UnitKey, Release] = {}
        self._tallies: dict[str, ShadowTally] = {}
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.loaded = False
        _VIEWS.append(self)

    # -- lookups (request path) -----------------------------------------------------------------

    def stable(self, key: UnitKey) -> str | None:
        unit = self._units.get(key)
        return unit.stable_version if unit is not None else None

    def release(self, key: UnitKey) -> Release | None:
        return self._active.get(key)

    def assign(self, key: UnitKey, tenant: str, draw: str) -> tuple[str | None, str]:
        """The version (None: no stable version known yet) and arm that serve (tenant, draw)."""
        release = self._active.get(key)
        if (
            release is not None
            and release.state in (State.CANARY, State.PAUSED)
            and on_candidate(key, release.candidate_version, release.weight, tenant, draw)
        ):
            return release.candidate_version, CANDIDATE
        return self.stable(key), STABLE

    def shadowing(self, key: UnitKey) -> Release | None:
        """The release whose candidate takes copies of this unit's calls now, if any."""
        release = self._active.get(key)
        return release if release is not None and release.state is State.SHADOW else None

    def on_change(self, listener: Listener) -> None:
        """Call ``listener`` after a refresh that changed some unit's stable version."""
        self._listeners.append(listener)

    # -- shadow tallies -------------------------------------------------------------------------

    def tally(self, release_id: str) -> ShadowTally:
        return self._tallies.setdefault(release_id, ShadowTally())

    async def _flush_tallies(self) -> None:
        tallies, self._tallies = self._tallies, {}
        for release_id, tally in tallies.items():
            if tally.compared:
                await self.store.add_shadow(release_id, self.replica, tally, self._clock())

    # -- refreshing -----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the units and the releases in progress (bootstrapping missing units first)."""
        async with self._lock:
            units = await self.store.units()
            for key, version in self._defaults():
                if key not in units:
                    stable = await self.store.ensure_unit(
                        key, version, by="bootstrap", now=self._clock()
                    )
                    units[key] = Unit(stable, "")
            active = {r.unit: r for r in await self.store.active() if r.state in ACTIVE}
            changed = {k: u.stable_version for k, u in units.items()} != {
                k: u.stable_version for k, u in self._units.items()
            }
            self._units, self._active = units, active
            self.loaded = True
            await self._flush_tallies()
        if changed:
            for listener in self._listeners:
                listener()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._sync_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("release state refresh failed; serving the last one read")

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="release-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._flush_tallies()
        if self in _VIEWS:
            _VIEWS.remove(self)


_STATES = list(State)


def _observe_weights(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(
            release.weight,
            {"unit": key.label, "release": release.id, "candidate": release.candidate_version},
        )
        for view in _VIEWS
        for key, release in view._active.items()
    ]


def _observe_states(_options: CallbackOptions) -> list[Observation]:
    points = []
    for view in _VIEWS:
        for key, release in view._active.items():
            for state in _STATES:
                if state in ACTIVE:
                    points.append(
                        Observation(
                            int(release.state is state),
                            {"unit": key.label, "release": release.id, "state": state.value},
                        )
                    )
    return points


meter().create_observable_gauge(
    "toolmesh.router.release.weight",
    callbacks=[_observe_weights],
    unit="%",
    description="The candidate's share of live traffic, per release in progress",
)
meter().create_observable_gauge(
    "toolmesh.router.release.state",
    callbacks=[_observe_states],
    unit="{release}",
    description="1 for the state each release in progress is in (shadow, canary, paused, "
    "monitoring), 0 for the others",
)
