"""The CLI's token cache: one access token per client and gateway, reused until it nears expiry.

Minting a token costs auth an argon2 hash and an audit event, so every command minting its own
made scripts slow and flooded the trail. Tokens are kept in ``tokens.json`` under the user's
cache directory (TOOLMESH_CACHE_DIR, else $XDG_CACHE_HOME/toolmesh, else ~/.cache/toolmesh),
the directory 0700 and the file 0600, replaced atomically. An entry is keyed by a hash of the
gateway address, the client id and its secret, so a new secret or another mesh never reuses a
token. TOOLMESH_TOKEN_CACHE=off turns the cache off. A cache that cannot be read or written is
ignored: the command then mints a token as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

FILE_NAME = "tokens.json"
# A cached token is used only while it has at least this long left (or a quarter of its
# lifetime, for short-lived tokens), so it does not expire during the command.
MARGIN_S = 60.0


class TokenReply(Protocol):
    @property
    def access_token(self) -> str: ...

    @property
    def expires_in(self) -> int: ...


def cache_dir() -> Path:
    explicit = os.environ.get("TOOLMESH_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "toolmesh"


def enabled() -> bool:
    return os.environ.get("TOOLMESH_TOKEN_CACHE", "").strip().lower() not in ("off", "0", "no")


def cache_key(target: str, client_id: str, secret: str) -> str:
    return hashlib.sha256(f"{target}\0{client_id}\0{secret}".encode()).hexdigest()[:32]


def _load(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, entries: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle)
        os.replace(tmp, path)
    except OSError:
        return


def _usable(entry: object, now: float) -> str | None:
    if not isinstance(entry, dict):
        return None
    token, expires_at, lifetime = (
        entry.get("access_token"),
        entry.get("expires_at"),
        entry.get("lifetime_s"),
    )
    if not isinstance(token, str) or not isinstance(expires_at, (int, float)):
        return None
    margin = min(MARGIN_S, float(lifetime) / 4 if isinstance(lifetime, (int, float)) else MARGIN_S)
    return token if expires_at - now > margin else None


def cached_token(
    key: str, issue: Callable[[], TokenReply], *, now: float | None = None
) -> tuple[str, bool]:
    """The cached token for ``key`` while it is fresh enough (and True: reused); else a new
    one from ``issue``, cached for the next command (and False)."""
    if not enabled():
        return issue().access_token, False
    path = cache_dir() / FILE_NAME
    moment = time.time() if now is None else now
    entries = _load(path)
    token = _usable(entries.get(key), moment)
    if token is not None:
        return token, True
    reply = issue()
    live = {k: v for k, v in entries.items() if _usable(v, moment) is not None}
    live[key] = {
        "access_token": reply.access_token,
        "expires_at": moment + reply.expires_in,
        "lifetime_s": reply.expires_in,
    }
    _save(path, live)
    return reply.access_token, False


def forget(key: str) -> None:
    """Drop a token the server refused (revoked, or signed by a key since retired)."""
    path = cache_dir() / FILE_NAME
    entries = _load(path)
    if entries.pop(key, None) is not None:
        _save(path, entries)
