"""SQLite's durability per commit: ``sqlite_synchronous`` of every service that writes SQLite.

FULL (the default): a committed write survives power loss or an OS crash, not only a crash of
the process. NORMAL in WAL mode: a committed write survives a crash of the process (kill -9),
but the last commits before a power loss or OS crash may be lost; it saves the fsync of every
commit (the WAL is synced at checkpoints), like PostgreSQL's ``synchronous_commit=off``.
docs/reliability.md states the trade. Kept apart from services.kit.db so that the outbox
does not import SQLAlchemy.
"""

from __future__ import annotations

from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]
SYNCHRONOUS_MODES: tuple[Synchronous, ...] = ("FULL", "NORMAL")


def checked(synchronous: str) -> Synchronous:
    """``synchronous`` if it is a mode this module offers, else ValueError."""
    for mode in SYNCHRONOUS_MODES:
        if synchronous == mode:
            return mode
    raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
