"""Memory settings: TOOLMESH_MEMORY_<NAME>, falling back to TOOLMESH_<NAME>."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.kit.durability import Synchronous
from services.kit.settings import DEFAULT_PORTS, DatabaseSettings


class MemorySettings(DatabaseSettings):
    service_name: ClassVar[str] = "memory"

    port: int = Field(default=DEFAULT_PORTS["memory"], ge=0, le=65535)
    # Empty means the SQLite file <data_dir>/memory.db; PostgreSQL for several replicas.
    database_url: str = ""
    # SQLite only: PRAGMA synchronous of its database. FULL: a committed write survives
    # power loss (today's guarantee). NORMAL (WAL): it survives kill -9 of the process but
    # not a power loss or OS crash, and saves an fsync per commit (docs/reliability.md).
    sqlite_synchronous: Synchronous = "FULL"
    # Group commit under concurrent load: an append or claim that finds the writer idle waits
    # up to this long for others to share its transaction and fsync (a lone caller never
    # waits); every caller is answered after the shared commit. 0 writes at once.
    group_commit_window_ms: float = Field(default=2.0, ge=0, le=100)
    # GetHistory with limit 0 returns this many turns; larger limits are capped at the maximum.
    default_history_limit: int = Field(default=100, ge=1)
    max_history_limit: int = Field(default=1000, ge=1)
    # The idempotency window: a request's claim and kept answer live this long after the claim's
    # lease ran out or the request completed. Within it a retry with the same key gets the
    # answer; after it the answer is gone (a retry in the same session then learns only that
    # the request completed). Turns are kept regardless.
    idempotency_window_hours: float = Field(default=24, gt=0)
    # How often housekeeping deletes request records past the idempotency window (in batches).
    housekeeping_interval_s: float = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> MemorySettings:
        if self.default_history_limit > self.max_history_limit:
            raise ValueError("default_history_limit must not exceed max_history_limit")
        return self
