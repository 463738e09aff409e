"""Configuration files reloaded while a service runs (routing rules, prices, SLOs).

A file mounted from a ConfigMap changes under a running pod; a restart for every edit would
be an outage's worth of churn. ``Reloadable`` holds the configuration in use and swaps it only
for one that loaded and validated in full: a file that does not parse, does not validate, or
would be unsafe to swap in (``check``) keeps the old configuration and logs one ERROR line
naming the file and the problem (no traceback: it is an operator's edit, not a bug), once
per bad content rather than at every poll.

Change is detected by content (a SHA-256 of the files), not by mtime alone: a ConfigMap
update swaps a symlink, and an edit within the mtime granularity would be missed. The files
are small, so hashing them every ``config_reload_s`` costs nothing worth measuring.
``watch`` polls with services.kit.periodic and also reloads at once on SIGHUP.

Metrics: ``toolmesh.config.version`` (1 per configuration in use, with its declared version
and content digest) and ``toolmesh.config.reloads`` (changes seen, by outcome: applied or
rejected).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.metrics import meter
from services.kit.periodic import Stop, every

log = logging.getLogger("toolmesh.config")

T = TypeVar("T")

DIGEST_CHARS = 12


def digest(paths: Sequence[Path]) -> str:
    """The content hash of ``paths`` (names and bytes, in the order given); OSError if one
    cannot be read."""
    sha = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        sha.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return sha.hexdigest()[:DIGEST_CHARS]


class Reloadable(Generic[T]):
    """One configuration: ``load`` reads and validates it in full (raising ValueError or
    OSError with a message fit for an operator), ``version_of`` names it, ``check(old, new)``
    refuses an unsafe swap (ValueError), ``applied(new)`` is told after a swap."""

    def __init__(
        self,
        name: str,
        sources: Callable[[], Sequence[Path]],
        load: Callable[[], T],
        version_of: Callable[[T], str],
        *,
        check: Callable[[T, T], None] | None = None,
        applied: Callable[[T], None] | None = None,
    ) -> None:
        self.name = name
        self._sources = sources
        self._load = load
        self._version_of = version_of
        self.check = check
        self.applied = applied
        # Start-up loads as before: a bad file there fails start-up (the caller's guard).
        self.digest = digest(sources())
        self.current: T = load()
        self._rejected = ""
        _CONFIGS.add(self)

    @property
    def version(self) -> str:
        return self._version_of(self.current)

    def attributes(self) -> dict[str, str]:
        """For GetServiceInfo: ``config.<name>.version`` and ``config.<name>.digest``."""
        return {
            f"config.{self.name}.version": self.version,
            f"config.{self.name}.digest": self.digest,
        }

    def reload(self) -> bool:
        """Load the files again if their content changed; True when a new one is in use."""
        try:
            seen = digest(self._sources())
        except OSError as error:
            seen = f"unreadable:{error}"
            if seen != self._rejected:
                self._reject(seen, f"cannot read: {error}")
            return False
        if seen in (self.digest, self._rejected):
            return False
        try:
            new = self._load()
            if self.check is not None:
                self.check(self.current, new)
        except (ValueError, TypeError, KeyError, OSError) as error:
            # A loader's message names the file's problem; anything else is our bug and
            # propagates (logged with its traceback by the caller).
            self._reject(seen, str(error))
            return False
        old_version = self.version
        self.current, self.digest, self._rejected = new, seen, ""
        if self.applied is not None:
            self.applied(new)
        _RELOADS.add(1, {"config": self.name, "outcome": "applied"})
        log.info(
            "configuration reloaded",
            extra={
                "config": self.name,
                "version": self.version,
                "previous_version": old_version,
                "digest": seen,
            },
        )
        return True

    def _reject(self, seen: str, problem: str) -> None:
        self._rejected = seen
        _RELOADS.add(1, {"config": self.name, "outcome": "rejected"})
        log.error(
            f"{self.name} configuration not reloaded, keeping version {self.version}: {problem}",
            extra={"config": self.name, "kept_version": self.version, "problem": problem},
        )


# Reloaded on SIGHUP: every watched configuration of this process (tests run several servers).
_WATCHED: list[Reloadable[Any]] = []


def _reload_all() -> None:
    for config in list(_WATCHED):
        try:
            config.reload()
        except Exception:
            log.exception("configuration reload failed", extra={"config": config.name})


def watch(interval_s: float, *configs: Reloadable[Any]) -> Stop:
    """Reload ``configs`` every ``interval_s`` seconds (0: only on SIGHUP) and on SIGHUP;
    returns the stop function. Must be called inside the running event loop."""
    loop = asyncio.get_running_loop()
    if not _WATCHED:
        # Not in the main thread (an embedding test harness): polling alone.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, _reload_all)
    _WATCHED.extend(configs)

    async def poll() -> None:
        for config in configs:
            config.reload()

    stop_polling = None
    if interval_s > 0:
        stop_polling = every(interval_s, poll, name="config-reload", first_after_s=interval_s)

    async def stop() -> None:
        if stop_polling is not None:
            await stop_polling()
        for config in configs:
            with contextlib.suppress(ValueError):
                _WATCHED.remove(config)
        if not _WATCHED:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)

    return stop


_CONFIGS: weakref.WeakSet[Reloadable[Any]] = weakref.WeakSet()


def _observe_versions(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(1, {"config": c.name, "version": c.version, "digest": c.digest})
        for c in list(_CONFIGS)
    ]


_RELOADS = meter().create_counter(
    "toolmesh.config.reloads",
    unit="{reload}",
    description="Configuration file changes seen, by configuration and outcome (applied, "
    "rejected: the old configuration stays in use).",
)
meter().create_observable_gauge(
    "toolmesh.config.version",
    callbacks=[_observe_versions],
    unit="{config}",
    description="1 for each configuration in use, with its declared version and content digest.",
)

__all__ = ["Reloadable", "digest", "watch"]
